"""Tripwires: acting on what an agent writes and on what the kernel sees it do.

Three sources of findings, one way of acting on them:

* output: every write an agent makes to stdout or stderr passes through an
  OutputTap on the reactor thread before it reaches the log file
  (daemon.monitor.matcher scans it against the text rules);
* kernel signals: the sampler calls on_signals after each sample
  (signal rules: processes per second, sockets, exec outside an allowlist);
* an out-of-process detector's verdicts (daemon.monitor.detector), capped at
  ``detector_max_action``.

The decision (which action, and its monotonic timestamp) is taken where the
finding is made, at once; acting (cgroup freeze or kill) and auditing (an
fsync per record) are handed to the reactor's pool, so the reactor keeps
draining every agent's pipes. As on the signed kill path, the action comes
first and its audit record after.

An agent cannot flood the audit log through its own output: each rule is
audited at most once per AUDIT_INTERVAL_S per agent; later matches in the
window are counted, and the count goes into the next record (``suppressed``)
or, if none follows, into a ``tripwire_suppressed`` record.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from daemon.errors import AgentdError, ConfigError
from daemon.monitor.detector import DetectorLink, Verdict, cap
from daemon.monitor.matcher import Hit, StreamScanner, TextMatcher
from daemon.monitor.model import Signals
from daemon.monitor.rules import SEVERITY, STREAMS, Action, RuleSet
from daemon.users import AgentUser, resolve

if TYPE_CHECKING:
    from daemon.audit import AuditLog
    from daemon.config import Config
    from daemon.monitor.sampler import Sampler
    from daemon.supervisor.agent import Agent
    from daemon.supervisor.killer import KillOutcome
    from daemon.supervisor.reactor import Reactor

log = logging.getLogger(__name__)

AUDIT_INTERVAL_S = 1.0
# The reactor runs its tickers on every pass; the flush of suppressed counts
# looks at the clock no more often than this.
_FLUSH_EVERY_S = 0.25


@dataclass(frozen=True)
class Finding:
    """Something an agent did that a rule (or the detector) names."""

    rule: str
    kind: str  # literal | regex | signal | detector
    action: Action  # what is to be done (a detector's verdict after the cap)
    event: str = "tripwire"  # the audit record's event
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass
class _Window:
    audited_at: float
    suppressed: int = 0


@dataclass(frozen=True)
class _Order:
    """What report() decided, for the pool to carry out."""

    act: Action | None  # None: only audit
    cause: str  # the most forceful rule among the findings
    audits: list[tuple[Finding, int]]  # findings to audit, with their suppressed counts
    detected: float  # monotonic time of the decision


class _Watch:
    """What the tripwires remember of one agent (kept only while the agent is)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = weakref.ref(agent)
        self.lock = threading.Lock()
        self.windows: dict[str, _Window] = {}
        self.freeze_pending = False
        self.kill_pending = False


class OutputTap:
    """Called by the agent's LogSink with each write, before it reaches the file."""

    __slots__ = ("_agent", "_detector", "_owner", "_scanner", "_stream")

    def __init__(self, owner: Tripwires, agent: Agent, stream: str,
                 scanner: StreamScanner | None, detector: DetectorLink | None) -> None:
        self._owner = owner
        self._agent = agent
        self._stream = stream
        self._scanner = scanner
        self._detector = detector

    def feed(self, data: bytes) -> None:
        """Scan one write and decide at once; never waits on anything slow."""
        if self._scanner is not None:
            hits = self._scanner.feed(data)
            if hits:
                self._owner.report(self._agent, [_from_hit(h) for h in hits], time.monotonic())
        if self._detector is not None:
            self._detector.submit(self._agent, self._stream, data)

    def close(self) -> None:
        """The stream ended (EOF on the pipe)."""


def _from_hit(hit: Hit) -> Finding:
    return Finding(rule=hit.rule.name, kind=hit.rule.kind, action=hit.rule.action,
                   fields={"stream": hit.stream, "offset": hit.offset, "excerpt": hit.excerpt})


class Enforcement(Protocol):
    """What the tripwires need of the supervisor: act on an agent, audit, schedule.

    A narrow interface, wired in the supervisor: the monitor never takes the
    Supervisor class (the dependency points one way).
    """

    cfg: Config
    audit: AuditLog
    reactor: Reactor
    sampler: Sampler

    def kill_agent(self, agent: Agent, reason: str) -> KillOutcome: ...

    def freeze_agent(self, agent: Agent, frozen: bool) -> tuple[bool, float]: ...


class Tripwires:
    """The rules, the detector link, and the actions they order on a supervisor."""

    def __init__(self, sup: Enforcement, rules: RuleSet) -> None:
        self.sup = sup
        self.rules = rules
        self._matchers = {s: TextMatcher(rules.text, s) for s in STREAMS}
        self._watches: weakref.WeakKeyDictionary[Agent, _Watch] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._unflushed: set[_Watch] = set()
        self._next_flush = 0.0
        self.detector: DetectorLink | None = None
        cfg = sup.cfg
        if cfg.detector_command:
            try:
                argv = shlex.split(cfg.detector_command)
            except ValueError as err:
                raise ConfigError(f"detector_command: {err}") from err
            self.detector = DetectorLink(
                argv, user=_detector_user(cfg.detector_user),
                on_verdict=self.on_verdict, on_event=self._audit_event)

    # ------------------------------------------------------------ wiring
    def start(self) -> None:
        """Start the detector, and listen to the sampler if the supervisor has one."""
        self.sup.reactor.add_ticker(self.flush_suppressed)
        sampler = getattr(self.sup, "sampler", None)
        if self.rules.signal and sampler is not None:
            sampler.measure_rates_over(self.rules.rate_windows())
            sampler.add_listener(self.on_signals)
        elif self.rules.signal:
            log.warning("%d signal rule(s) loaded but no sampler runs: they cannot fire",
                        len(self.rules.signal))
        if self.detector is not None:
            self.detector.start()

    def stop(self) -> None:
        if self.detector is not None:
            self.detector.stop()

    def tap(self, agent: Agent, stream: str) -> OutputTap | None:
        """The tap for one of agent's streams; None when nothing watches that stream."""
        matcher = self._matchers[stream]
        if not matcher and self.detector is None:
            return None
        self._watch(agent)
        return OutputTap(self, agent, stream, matcher.scanner() if matcher else None,
                         self.detector)

    def _watch(self, agent: Agent) -> _Watch:
        with self._lock:
            w = self._watches.get(agent)
            if w is None:
                w = self._watches[agent] = _Watch(agent)
            return w

    # ---------------------------------------------------------- sources
    def on_signals(self, agent: Agent, signals: Signals) -> None:
        """Sampler listener: check the signal rules against a fresh sample."""
        findings = []
        for rule in self.rules.signal:
            what = rule.check(signals)
            if what is not None:
                findings.append(Finding(rule=rule.name, kind="signal", action=rule.action,
                                        fields={"metric": rule.metric, "finding": what}))
        if findings:
            self.report(agent, findings, time.monotonic())

    def on_verdict(self, agent: Agent, v: Verdict) -> None:
        """Detector verdict (its reader thread). Capped: a detector is trusted less."""
        capped = cap(v.verdict, self.sup.cfg.detector_max_action)
        if capped == "ok":
            return
        action = cast(Action, capped)
        self.report(agent, [Finding(
            rule="detector", kind="detector", action=action, event="detector_verdict",
            fields={"verdict": v.verdict, "capped": action != v.verdict, "score": v.score,
                    "reason": v.reason, "batch_seq": v.seq})], time.monotonic())

    # ---------------------------------------------------------- deciding
    def report(self, agent: Agent, findings: list[Finding], detected: float) -> None:
        """Decide now what to do about findings; act and audit in the pool.

        Safe from any thread; takes two short locks and never blocks on I/O.
        """
        watch = self._watch(agent)
        audits: list[tuple[Finding, int]] = []
        act: Action | None = None
        with watch.lock:
            for f in findings:
                w = watch.windows.get(f.rule)
                if w is None or detected - w.audited_at >= AUDIT_INTERVAL_S:
                    audits.append((f, w.suppressed if w else 0))
                    watch.windows[f.rule] = _Window(detected)
                else:
                    w.suppressed += 1
                    with self._lock:
                        self._unflushed.add(watch)
            strongest = max((f.action for f in findings), key=SEVERITY.__getitem__)
            ending = watch.kill_pending or agent.kill_requested or agent.is_ended
            if strongest == "kill" and not ending:
                watch.kill_pending, act = True, "kill"
            elif strongest == "freeze" and not ending and not watch.freeze_pending:
                watch.freeze_pending, act = True, "freeze"
        with agent.lock:
            # Kept in the signals so that the sampler carries it into each new
            # sample (it copies the count under this lock).
            agent.signals.tripwire_hits += len(findings)
        if act is None and not audits:
            return
        cause = max(findings, key=lambda f: SEVERITY[f.action]).rule
        self.sup.reactor.pool.submit(self._carry_out, agent, watch,
                                     _Order(act, cause, audits, detected))

    def _carry_out(self, agent: Agent, watch: _Watch, order: _Order) -> None:
        """In the pool: the action first, then the audit records."""
        act, result = order.act, ""
        try:
            if act == "kill":
                out = self.sup.kill_agent(agent, f"tripwire:{order.cause}")
                result = "killed" if out.verified_empty else "kill_incomplete"
            elif act == "freeze":
                done, _ = self.sup.freeze_agent(agent, True)
                result = "frozen" if done else "freeze_unverified"
        except Exception:
            log.exception("tripwire %s could not %s agent %s", order.cause, act, agent.id)
            result = f"{act}_failed"
        finally:
            if act == "freeze":
                with watch.lock:
                    watch.freeze_pending = False
        acted = time.monotonic()
        for f, suppressed in order.audits:
            if f.action == "alert":
                outcome = "alerted"
            elif act is not None:
                outcome = result
            else:
                outcome = "already_ending" if (watch.kill_pending or agent.kill_requested
                                               or agent.is_ended) else "freeze_in_progress"
            self._append(f.event, name=agent.name, agent_id=agent.id, rule=f.rule, kind=f.kind,
                         action=f.action, outcome=outcome, suppressed=suppressed, **f.fields,
                         hits=agent.signals.tripwire_hits,
                         detected_mono=round(order.detected, 6), done_mono=round(acted, 6))

    # -------------------------------------------------------- suppressed
    def flush_suppressed(self) -> None:
        """Reactor ticker: audit the counts of windows that closed with matches unaudited."""
        if not self._unflushed:
            return
        now = time.monotonic()
        if now < self._next_flush:
            return
        self._next_flush = now + _FLUSH_EVERY_S
        due: list[tuple[Agent, str, int]] = []
        with self._lock:
            watches = list(self._unflushed)
        for watch in watches:
            agent = watch.agent()
            with watch.lock:
                for rule, w in watch.windows.items():
                    if w.suppressed and now - w.audited_at >= AUDIT_INTERVAL_S:
                        if agent is not None:
                            due.append((agent, rule, w.suppressed))
                        w.suppressed = 0
                if not any(w.suppressed for w in watch.windows.values()):
                    # Under the watch's lock (then ours, as in report()), so a
                    # count added meanwhile cannot be left out of the set.
                    with self._lock:
                        self._unflushed.discard(watch)
        for agent, rule, n in due:
            self.sup.reactor.pool.submit(self._append, "tripwire_suppressed", name=agent.name,
                                         agent_id=agent.id, rule=rule, suppressed=n)

    # ----------------------------------------------------------- audit
    def _append(self, event: str, **fields: object) -> None:
        try:
            self.sup.audit.append(event, **fields)
        except Exception:
            log.exception("cannot audit %s", event)

    def _audit_event(self, event: str, fields: Mapping[str, object]) -> None:
        """The detector link's lifecycle records (started, exited, failed to start)."""
        self._append(event, **fields)

    def stats(self) -> dict[str, object]:
        """For status lines and metrics: rule counts and the detector's counters."""
        out: dict[str, object] = {"text_rules": len(self.rules.text),
                                  "signal_rules": len(self.rules.signal),
                                  "rules_source": self.rules.source}
        if self.detector is not None:
            out["detector"] = self.detector.stats.as_dict()
        return out


def _detector_user(name: str) -> AgentUser:
    """The detector's user. Raises ConfigError for a missing user, root, or group 0."""
    try:
        # allow_root=False: resolve refuses uid 0 and members of group 0.
        return resolve(name, allow_root=False)
    except AgentdError as err:
        raise ConfigError(f"detector_user: {err.message}") from err
