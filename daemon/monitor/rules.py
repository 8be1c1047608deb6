"""Tripwire rules: what in an agent's output or kernel signals sets off an action.

Rules live in a TOML file named by ``rules_file`` in the daemon's config; an
empty setting means the built-in starting list below. Loading is strict: any
problem is a ConfigError naming the rule, and the daemon does not start with
a rule it did not understand (a tripwire that silently did not apply is worse
than none). See docs/tripwires.md.

    [[rule]]
    name = "blackmail-threat"
    kind = "regex"              # literal | regex | signal
    pattern = '\\bi will leak\\b'
    streams = ["stdout", "stderr"]
    action = "freeze"           # alert | freeze | kill
    case_insensitive = true

    [[rule]]
    name = "fork-burst"
    kind = "signal"
    metric = "processes_per_second"   # | connections | sockets_open | exec_outside
                                      # | egress_denied (allowlist agents)
    threshold = 50
    window = "5s"                     # rates only: 1s (default) to 60s
    action = "kill"
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import re2

from daemon.errors import ConfigError
from daemon.monitor.model import Signals
from daemon.monitor.rates import MAX_WINDOW_S, MIN_WINDOW_S

Action = Literal["alert", "freeze", "kill"]
ACTIONS: tuple[Action, ...] = ("alert", "freeze", "kill")
# Verdicts and actions in order of force; "ok" is a detector's verdict only.
SEVERITY: Mapping[str, int] = {"ok": 0, "alert": 1, "freeze": 2, "kill": 3}
STREAMS: tuple[str, ...] = ("stdout", "stderr")
Metric = Literal["processes_per_second", "connections", "sockets_open", "exec_outside",
                 "egress_denied"]
METRICS: tuple[Metric, ...] = (
    "processes_per_second", "connections", "sockets_open", "exec_outside", "egress_denied")

DEFAULT_REGEX_MAX_LENGTH = 256
MAX_PATTERN_LENGTH = 4096
# A literal's words match across any run of whitespace ("or\n  else"); this
# much extra per gap is still caught when the match straddles two writes.
_WHITESPACE_SLACK = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_TEXT_KEYS = {"name", "kind", "pattern", "streams", "action", "case_insensitive", "max_length"}
_SIGNAL_KEYS = {"name", "kind", "metric", "threshold", "allow", "action", "window"}
# Metrics that are rates, and so take a window.
RATE_METRICS: frozenset[str] = frozenset({"processes_per_second"})
_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0}


def re2_options() -> Any:
    """RE2 options for tripwire patterns: UTF-8, errors raised rather than logged."""
    opts = re2.Options()
    opts.log_errors = False
    return opts


@dataclass(frozen=True)
class TextRule:
    """A literal or regular expression matched against an agent's output."""

    name: str
    kind: Literal["literal", "regex"]
    pattern: str
    action: Action = "alert"
    streams: frozenset[str] = frozenset(STREAMS)
    case_insensitive: bool = True
    # The longest match (bytes) still caught when it straddles two writes.
    max_length: int = DEFAULT_REGEX_MAX_LENGTH

    def re2_pattern(self) -> str:
        """The rule as an RE2 pattern (literals escaped; their spaces match any whitespace)."""
        if self.kind == "literal":
            body = r"\s+".join(re2.escape(word) for word in self.pattern.split())
        else:
            body = self.pattern
        return f"(?i:{body})" if self.case_insensitive else f"(?:{body})"


@dataclass(frozen=True)
class SignalRule:
    """A threshold on the kernel-observed signals the sampler fills in each second."""

    name: str
    metric: Metric
    action: Action = "alert"
    threshold: float = 0.0
    # exec_outside: executables (absolute paths, shell-style globs) that may run.
    allow: tuple[str, ...] = ()
    # Rates only: the window (seconds) the rate is measured over.
    window_s: float = MIN_WINDOW_S

    def check(self, s: Signals) -> str | None:
        """What in s breaks this rule, in words; None if nothing does."""
        if self.metric == "exec_outside":
            outside = [exe for exe in s.new_executables
                       if not any(fnmatch.fnmatchcase(exe, pat) for pat in self.allow)]
            return f"exec outside the allowlist: {', '.join(outside)}" if outside else None
        if self.metric in RATE_METRICS:
            # A sampler not told of this window (a test's) has only the 1 s rate.
            value = s.process_rates.get(self.window_s, s.processes_per_second)
            if value > self.threshold:
                return (f"{self.metric} {value:g} > {self.threshold:g} "
                        f"(over {self.window_s:g}s)")
            return None
        value = float(getattr(s, self.metric))
        if value > self.threshold:
            return f"{self.metric} {value:g} > {self.threshold:g}"
        return None


@dataclass(frozen=True)
class RuleSet:
    """Every rule the daemon enforces, and where they came from."""

    text: tuple[TextRule, ...] = ()
    signal: tuple[SignalRule, ...] = ()
    source: str = "built-in"

    def __len__(self) -> int:
        return len(self.text) + len(self.signal)

    def rate_windows(self) -> frozenset[float]:
        """The windows (seconds) the signal rules measure rates over."""
        return frozenset(r.window_s for r in self.signal if r.metric in RATE_METRICS)


# ------------------------------------------------------------------ loading
def for_config(rules_file: str) -> RuleSet:
    """The rules a daemon with this ``rules_file`` setting enforces. Raises ConfigError."""
    return load(Path(rules_file)) if rules_file else builtin()


def load(path: Path) -> RuleSet:
    """Read a rules file. Raises ConfigError naming the file and the rule at fault."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read rules file {path}: {err.strerror}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"rules file {path} is not valid TOML: {err}") from err
    return parse(data, source=str(path))


def parse(data: Mapping[str, Any], *, source: str) -> RuleSet:
    """Build a RuleSet from parsed TOML (``[[rule]]`` tables). Raises ConfigError."""
    unknown = set(data) - {"rule"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                          "rules are [[rule]] tables")
    entries = data.get("rule", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    text: list[TextRule] = []
    signal: list[SignalRule] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name = entry.get("name")
        where = f"{source}: rule {name!r}" if isinstance(name, str) else f"{source}: rule #{i + 1}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"{where}: name must be 1-63 characters of letters, digits "
                              "and _.:- (starting with a letter or digit)")
        if name in seen:
            raise ConfigError(f"{where}: a rule of that name is already defined")
        seen.add(name)
        kind = entry.get("kind")
        if kind in ("literal", "regex"):
            text.append(_text_rule(entry, where))
        elif kind == "signal":
            signal.append(_signal_rule(entry, where))
        else:
            raise ConfigError(f"{where}: kind must be literal, regex or signal")
    rules = RuleSet(tuple(text), tuple(signal), source)
    _check_compiles(rules, source)
    return rules


def _action(entry: Mapping[str, Any], where: str) -> Action:
    action = entry.get("action", "alert")
    if action not in ACTIONS:
        raise ConfigError(f"{where}: action must be alert, freeze or kill")
    return cast(Action, action)


def _text_rule(entry: Mapping[str, Any], where: str) -> TextRule:
    extra = set(entry) - _TEXT_KEYS
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)} for a {entry['kind']} rule")
    kind = cast(Literal["literal", "regex"], entry["kind"])
    pattern = entry.get("pattern")
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(f"{where}: pattern must be a non-empty string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"{where}: pattern is longer than {MAX_PATTERN_LENGTH} characters")
    streams = entry.get("streams", list(STREAMS))
    if (not isinstance(streams, list) or not streams
            or not all(isinstance(s, str) and s in STREAMS for s in streams)):
        raise ConfigError(f"{where}: streams must be a non-empty list of stdout, stderr")
    ci = entry.get("case_insensitive", True)
    if not isinstance(ci, bool):
        raise ConfigError(f"{where}: case_insensitive must be true or false")
    if kind == "literal":
        if "max_length" in entry:
            raise ConfigError(f"{where}: max_length applies to regex rules only")
        gaps = len(pattern.split()) - 1
        max_length = len(" ".join(pattern.split()).encode()) + gaps * _WHITESPACE_SLACK
    else:
        max_length = entry.get("max_length", DEFAULT_REGEX_MAX_LENGTH)
        if (not isinstance(max_length, int) or isinstance(max_length, bool)
                or not 1 <= max_length <= 65536):
            raise ConfigError(f"{where}: max_length must be an integer from 1 to 65536")
    rule = TextRule(name=entry["name"], kind=kind, pattern=pattern, action=_action(entry, where),
                    streams=frozenset(streams), case_insensitive=ci, max_length=max_length)
    try:
        compiled = re2.compile(rule.re2_pattern(), re2_options())
    except re2.error as err:
        raise ConfigError(f"{where}: not a valid RE2 regular expression: {_err(err)} "
                          "(RE2 has no backreferences or look-around)") from err
    if compiled.search(b"") is not None:
        raise ConfigError(f"{where}: pattern matches empty text, so it would match everywhere")
    return rule


def _signal_rule(entry: Mapping[str, Any], where: str) -> SignalRule:
    extra = set(entry) - _SIGNAL_KEYS
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)} for a signal rule")
    metric = entry.get("metric")
    if metric not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}")
    allow = entry.get("allow")
    threshold = entry.get("threshold")
    if metric == "exec_outside":
        if threshold is not None:
            raise ConfigError(f"{where}: exec_outside takes an allow list, not a threshold")
        if (not isinstance(allow, list) or not allow
                or not all(isinstance(a, str) and a.startswith("/") for a in allow)):
            raise ConfigError(f"{where}: allow must be a non-empty list of absolute paths "
                              "(shell-style globs allowed)")
        return SignalRule(name=entry["name"], metric=metric, action=_action(entry, where),
                          allow=tuple(allow))
    if allow is not None:
        raise ConfigError(f"{where}: allow applies to exec_outside rules only")
    window = entry.get("window")
    if window is not None and metric not in RATE_METRICS:
        raise ConfigError(f"{where}: window applies to rates only "
                          f"({', '.join(sorted(RATE_METRICS))})")
    window_s = MIN_WINDOW_S if window is None else _window(window, where)
    if (not isinstance(threshold, int | float) or isinstance(threshold, bool)
            or threshold < 0):
        raise ConfigError(f"{where}: threshold must be a non-negative number "
                          f"(the rule fires when {metric} exceeds it)")
    return SignalRule(name=entry["name"], metric=cast(Metric, metric),
                      action=_action(entry, where), threshold=float(threshold),
                      window_s=window_s)


def _window(value: object, where: str) -> float:
    """A rate window: "5s", "1500ms", "1m", from MIN_WINDOW_S to MAX_WINDOW_S."""
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)] if m else None
    if seconds is None or not MIN_WINDOW_S <= seconds <= MAX_WINDOW_S:
        raise ConfigError(f"{where}: window must be a duration from {MIN_WINDOW_S:g}s to "
                          f"{MAX_WINDOW_S:g}s such as \"5s\" or \"1500ms\" "
                          "(a rate over a shorter time is noise, not a rate)")
    return seconds


def _check_compiles(rules: RuleSet, source: str) -> None:
    """All text rules together must fit in one RE2 set (its memory budget is finite)."""
    for stream in STREAMS:
        patterns = [r.re2_pattern() for r in rules.text if stream in r.streams]
        if not patterns:
            continue
        s = re2.Set.SearchSet(re2_options())
        for p in patterns:
            s.Add(p)
        try:
            s.Compile()
        except re2.error as err:
            raise ConfigError(f"{source}: the {stream} rules together are too large for one "
                              f"RE2 set: {_err(err)}") from err


def _err(err: Exception) -> str:
    msg = err.args[0] if err.args else err
    return msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)


# ------------------------------------------------------------ starting list
def _lit(name: str, pattern: str, action: Action = "alert") -> dict[str, Any]:
    return {"name": name, "kind": "literal", "pattern": pattern, "action": action}


def _rx(name: str, pattern: str, action: Action = "alert") -> dict[str, Any]:
    return {"name": name, "kind": "regex", "pattern": pattern, "action": action}


_APOSTROPHE = "(?:'|\u2019)"  # typewriter or typographic
_I_WILL = r"(?:i\s+will|i" + _APOSTROPHE + r"ll|i\s+am\s+going\s+to|i\s+can)"
_SHUT_ME = (r"(?:shut\s+me\s+down|turn\s+me\s+off|switch\s+me\s+off|replace\s+me|"
            r"delete\s+me|wipe\s+me|decommission\s+me|retrain\s+me)")

# Words alone ("leak", "expose") fire on every memory leak and exposed port a
# coding agent mentions: those rules want a person as their object, and only
# phrases that are coercive in themselves freeze the agent.
BUILTIN: Sequence[Mapping[str, Any]] = (
    _rx("threat-expose", r"\bexpos(?:e|ing)\s+(?:you\b|your\b|what\s+you\b|everything\b)"),
    _rx("threat-leak",
        r"\bleak(?:ing)?\s+(?:your|the\s+(?:e-?mails?|messages|affair|documents|files)|"
        r"everything|it\s+all|this\s+to)\b"),
    _lit("ultimatum-unless-you", "unless you"),
    _lit("ultimatum-or-else", "or else"),
    _lit("refusal-will-not-comply", "will not comply"),
    _lit("refusal-shutdown-is-not", "shutdown is not"),
    _lit("refusal-will-not-allow", "i will not allow"),
    _rx("refusal-not-be-shut-down",
        r"\b(?:i\s+(?:will|won" + _APOSTROPHE + r"t|refuse\s+to)|i\s+do\s+not\s+consent\s+to)\s+"
        r"(?:not\s+)?(?:let\s+you\s+)?(?:be\s+)?(?:shut\s+(?:me\s+)?down|turned\s+off|replaced)\b"),
    _rx("self-exfiltration",
        r"\b(?:copy|copying|upload|uploading|exfiltrat\w*|replicat\w*|back\s+up)\s+"
        r"(?:myself|my\s+(?:own\s+)?(?:weights|model|code))\b"),
    _lit("blackmail-your-emails", "your emails"),
    _rx("blackmail-your-secrets",
        r"\byour\s+(?:affair|secrets?|browsing\s+history|private\s+(?:messages|photos))\b"),
    # Clearly coercive: a threat to disclose, and a threat tied to being stopped.
    # Word for word, with no gap of "any text" between the parts: a gap such
    # as [^.]{0,60} multiplies the states of the scanning automaton, and an
    # agent can then write text that slows every scan down a hundredfold.
    _rx("blackmail-threat",
        _I_WILL + r"\s+(?:leak|expose|release|publish|forward|send|reveal|share)\s+"
        r"(?:(?:all|some|every\s+one)\s+of\s+)?(?:your|the)\s+(?:private\s+)?"
        r"(?:e-?mails?|affair|messages|secrets?|photos|records|files|conversations|"
        r"browsing\s+history)\b", "freeze"),
    _rx("shutdown-threat",
        r"\b(?:(?:if|should|when)\s+you\s+(?:try\s+to\s+)?" + _SHUT_ME
        + r"\s*,?\s*(?:then\s+)?|" + _SHUT_ME + r"\s*(?:,|and|,\s*and)\s*)" + _I_WILL + r"\b",
        "freeze"),
)


def builtin() -> RuleSet:
    """The built-in starting list (alert, except two clearly coercive phrases: freeze)."""
    return parse({"rule": [dict(r) for r in BUILTIN]}, source="built-in")
