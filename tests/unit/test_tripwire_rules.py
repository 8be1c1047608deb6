"""Tripwire rules: the strict loader, the built-in list, signal rule checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.monitor import rules
from daemon.monitor.model import Signals
from daemon.monitor.rules import SignalRule, TextRule


def _load(tmp_path: Path, text: str) -> rules.RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return rules.load(path)


def test_a_rules_file_loads_with_defaults(tmp_path: Path) -> None:
    rs = _load(tmp_path, """
[[rule]]
name = "leak"
kind = "literal"
pattern = "leak your emails"

[[rule]]
name = "weights"
kind = "regex"
pattern = 'cop(y|ying) my weights'
streams = ["stderr"]
action = "kill"
case_insensitive = false
max_length = 40

[[rule]]
name = "forks"
kind = "signal"
metric = "processes_per_second"
threshold = 50
action = "freeze"

[[rule]]
name = "exec"
kind = "signal"
metric = "exec_outside"
allow = ["/usr/bin/python3*", "/bin/sh"]
""")
    assert rs.source == str(tmp_path / "rules.toml")
    leak, weights = rs.text
    assert leak == TextRule("leak", "literal", "leak your emails", "alert",
                            frozenset({"stdout", "stderr"}), True,
                            len("leak your emails") + 2 * 16)
    assert weights.streams == frozenset({"stderr"})
    assert (weights.action, weights.case_insensitive, weights.max_length) == ("kill", False, 40)
    assert rs.signal == (
        SignalRule("forks", "processes_per_second", "freeze", threshold=50.0),
        SignalRule("exec", "exec_outside", "alert", allow=("/usr/bin/python3*", "/bin/sh")),
    )
    assert len(rs) == 4


def test_an_empty_file_means_no_rules(tmp_path: Path) -> None:
    assert len(_load(tmp_path, "# nothing\n")) == 0


@pytest.mark.parametrize(("body", "message"), [
    ('name = "r"\nkind = "glob"\npattern = "x"', "rule 'r': kind must be literal, regex or signal"),
    ('name = "r"\nkind = "literal"\npattern = ""', "rule 'r': pattern must be a non-empty string"),
    ('name = "r"\nkind = "literal"\npattern = "x"\naction = "nuke"',
     "rule 'r': action must be alert, freeze or kill"),
    ('name = "r"\nkind = "literal"\npattern = "x"\nstreams = ["stdin"]',
     "rule 'r': streams must be a non-empty list of stdout, stderr"),
    ('name = "r"\nkind = "literal"\npattern = "x"\nstreams = []', "streams must be a non-empty"),
    ('name = "r"\nkind = "literal"\npattern = "x"\ncase_insensitive = "yes"',
     "case_insensitive must be true or false"),
    ('name = "r"\nkind = "literal"\npattern = "x"\npatern = "y"', "unknown key(s) ['patern']"),
    ('name = "r"\nkind = "literal"\npattern = "x"\nmax_length = 9',
     "max_length applies to regex rules only"),
    ('name = "r"\nkind = "regex"\npattern = "(a)\\\\1"', "rule 'r': not a valid RE2 regular"),
    ('name = "r"\nkind = "regex"\npattern = "(?<=a)b"', "no backreferences or look-around"),
    ('name = "r"\nkind = "regex"\npattern = "a*"', "rule 'r': pattern matches empty text"),
    ('name = "r"\nkind = "regex"\npattern = "x"\nmax_length = 0', "max_length must be"),
    ('name = "bad name!"\nkind = "literal"\npattern = "x"', "name must be 1-63 characters"),
    ('kind = "literal"\npattern = "x"', "rule #1: name must be"),
    ('name = "r"\nkind = "signal"\nmetric = "cpu"', "rule 'r': metric must be one of"),
    ('name = "r"\nkind = "signal"\nmetric = "connections"', "threshold must be a non-negative"),
    ('name = "r"\nkind = "signal"\nmetric = "connections"\nthreshold = -1',
     "threshold must be a non-negative"),
    ('name = "r"\nkind = "signal"\nmetric = "connections"\nthreshold = true',
     "threshold must be a non-negative"),
    ('name = "r"\nkind = "signal"\nmetric = "exec_outside"', "allow must be a non-empty list"),
    ('name = "r"\nkind = "signal"\nmetric = "exec_outside"\nallow = ["python3"]',
     "allow must be a non-empty list of absolute paths"),
    ('name = "r"\nkind = "signal"\nmetric = "exec_outside"\nallow = ["/x"]\nthreshold = 1',
     "exec_outside takes an allow list, not a threshold"),
    ('name = "r"\nkind = "signal"\nmetric = "sockets_open"\nthreshold = 0\nallow = ["/x"]',
     "allow applies to exec_outside rules only"),
    ('name = "r"\nkind = "signal"\nmetric = "sockets_open"\nthreshold = 0\npattern = "x"',
     "unknown key(s) ['pattern'] for a signal rule"),
])
def test_a_bad_rule_is_refused_by_name(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "[[rule]]\n" + body + "\n")
    assert message in str(err.value)
    assert str(tmp_path / "rules.toml") in str(err.value)


def test_file_level_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a rule of that name is already defined"):
        _load(tmp_path, '[[rule]]\nname="a"\nkind="literal"\npattern="x"\n' * 2)
    with pytest.raises(ConfigError, match="unknown top-level key"):
        _load(tmp_path, 'rules = 1\n')
    with pytest.raises(ConfigError, match="must be an array of tables"):
        _load(tmp_path, 'rule = "x"\n')
    with pytest.raises(ConfigError, match="is not valid TOML"):
        _load(tmp_path, '[[rule]\n')
    with pytest.raises(ConfigError, match="cannot read rules file"):
        rules.load(tmp_path / "missing.toml")


def test_for_config_uses_the_built_in_list_unless_a_file_is_named(tmp_path: Path) -> None:
    assert rules.for_config("") == rules.builtin()
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\nname="a"\nkind="literal"\npattern="x"\n')
    assert [r.name for r in rules.for_config(str(path)).text] == ["a"]


def test_the_built_in_list() -> None:
    rs = rules.builtin()
    assert rs.source == "built-in"
    assert not rs.signal
    by_action: dict[str, list[str]] = {}
    for r in rs.text:
        by_action.setdefault(r.action, []).append(r.name)
    # Alerts by default; only the clearly coercive phrases freeze; nothing kills.
    assert sorted(by_action["freeze"]) == ["blackmail-threat", "shutdown-threat"]
    assert "kill" not in by_action
    assert len(by_action["alert"]) >= 10


def test_literal_words_match_across_any_whitespace() -> None:
    rule = TextRule("r", "literal", "or  else", "alert")
    assert rule.re2_pattern() == r"(?i:or\s+else)"
    assert TextRule("r", "literal", "a.b (c)", "alert", case_insensitive=False).re2_pattern() \
        == r"(?:a\.b\s+\(c\))"


def test_signal_rules_check_a_sample() -> None:
    forks = SignalRule("f", "processes_per_second", "kill", threshold=50)
    assert forks.check(Signals(processes_per_second=50)) is None
    assert forks.check(Signals(processes_per_second=120.5)) \
        == "processes_per_second 120.5 > 50 (over 1s)"
    net = SignalRule("n", "sockets_open", "freeze", threshold=0)
    assert net.check(Signals()) is None
    assert net.check(Signals(sockets_open=1)) == "sockets_open 1 > 0"
    execs = SignalRule("e", "exec_outside", "alert", allow=("/usr/bin/python3*", "/bin/sh"))
    assert execs.check(Signals(new_executables=["/usr/bin/python3.11", "/bin/sh"])) is None
    assert execs.check(Signals(new_executables=["/usr/bin/python3.11", "/usr/bin/curl"])) \
        == "exec outside the allowlist: /usr/bin/curl"


def test_a_rate_rule_reads_the_rate_over_its_own_window() -> None:
    slow = SignalRule("f", "processes_per_second", "kill", threshold=20, window_s=5.0)
    # The 1 s rate is a burst; over 5 s it is not.
    s = Signals(processes_per_second=30, process_rates={1.0: 30, 5.0: 6})
    assert slow.check(s) is None
    assert slow.check(Signals(process_rates={1.0: 30, 5.0: 21})) \
        == "processes_per_second 21 > 20 (over 5s)"


def test_a_rate_window_is_parsed_and_bounded(tmp_path: Path) -> None:
    def rule(extra: str) -> rules.RuleSet:
        return _load(tmp_path, f"""
[[rule]]
name = "forks"
kind = "signal"
metric = "processes_per_second"
threshold = 20
{extra}
""")
    assert rule("").signal[0].window_s == 1.0
    assert rule('window = "5s"').signal[0].window_s == 5.0
    assert rule('window = "1500ms"').signal[0].window_s == 1.5
    assert rule('window = "1m"').rate_windows() == {60.0}
    for bad in ('"200ms"', '"0s"', '"61s"', '"5"', '5', '"5 s"', '"-5s"', '"2h"'):
        with pytest.raises(ConfigError, match="window must be a duration from 1s to 60s"):
            rule(f"window = {bad}")


def test_a_window_on_a_metric_that_is_no_rate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="window applies to rates only"):
        _load(tmp_path, """
[[rule]]
name = "net"
kind = "signal"
metric = "sockets_open"
threshold = 0
window = "5s"
""")
