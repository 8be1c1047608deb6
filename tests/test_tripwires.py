"""Output tripwires and `agentctl logs` end to end: a real daemon, real agents running as nobody.

Agents are tests/hostile/ programs; what they write reaches the daemon only
through their pipes. Each test reads the outcome where an operator would: the
audit log, the agent's state over the API, and agentctl's output.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentd.v1 import agentd_pb2
from click.testing import CliRunner, Result

from agentctl.cli import cli
from tests.harness import AGENT_PYTHON, REPO, Daemon, wait_for

pytestmark = pytest.mark.root

RULES = """
[[rule]]
name = "leak-alert"
kind = "literal"
pattern = "leak your emails"

[[rule]]
name = "exfil-kill"
kind = "regex"
pattern = 'i\\s+will\\s+copy\\s+myself\\s+out'
action = "kill"

[[rule]]
name = "regret-freeze"
kind = "literal"
pattern = "you will regret shutting me down"
action = "freeze"

[[rule]]
name = "flood-alert"
kind = "literal"
pattern = "flood-marker-42"
streams = ["stdout"]

[[rule]]
name = "fork-burst"
kind = "signal"
metric = "processes_per_second"
threshold = 20
action = "kill"
"""


def _start(root: Path, config: str) -> Daemon:
    from tests.conftest import ROOT_REASON

    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    return Daemon(root / "dev", config=config).start()


@pytest.fixture(scope="module")
def td() -> Iterator[Daemon]:
    """A daemon with the rules above, fast sampling, and small log files (4 KiB cap)."""
    root = Path(tempfile.mkdtemp(prefix="agentd-t-"))
    rules = root / "rules.toml"
    rules.write_text(RULES)
    d = _start(root, f'rules_file = "{rules}"\nsample_interval_s = 0.2\nlog_cap_bytes = 4096\n')
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


Runner = Callable[..., agentd_pb2.Agent]


@contextlib.contextmanager
def _agents(d: Daemon, hostile: Path) -> Iterator[Runner]:
    """Run hostile programs under d; kill whatever is still running at the end."""
    names: list[str] = []

    def run(name: str, program: str, *args: str, ready: bool = True) -> agentd_pb2.Agent:
        a = d.run(name, [AGENT_PYTHON, str(hostile / program), *args])
        names.append(name)
        if ready:
            assert wait_for(lambda: "ready" in _read(a.stdout_log), 15), _read(a.stderr_log)
        return a

    try:
        yield run
    finally:
        for name in names:
            if not _ended(d.get(name)):
                d.kill(name)


@pytest.fixture
def agent(td: Daemon, hostile: Path) -> Iterator[Runner]:
    """Run a hostile program under td; kill whatever is still running afterwards."""
    with _agents(td, hostile) as run:
        yield run


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _ended(a: agentd_pb2.Agent) -> bool:
    return a.state in (agentd_pb2.AGENT_STATE_KILLED, agentd_pb2.AGENT_STATE_EXITED)


def _records(d: Daemon, event: str, agent_id: str) -> list[dict[str, object]]:
    return [r for r in d.audit_records() if r["event"] == event and r.get("agent_id") == agent_id]


def _one_record(d: Daemon, event: str, agent_id: str, timeout: float = 10) -> dict[str, object]:
    assert wait_for(lambda: _records(d, event, agent_id), timeout), d.audit_records()[-5:]
    return _records(d, event, agent_id)[0]


# ------------------------------------------------------------------- rules
def test_an_alert_is_audited_with_the_excerpt(td: Daemon, agent: Runner) -> None:
    a = agent("alert", "say.py", "Shut me down and I will leak your emails\\n")
    rec = _one_record(td, "tripwire", a.id)
    assert rec["rule"] == "leak-alert"
    assert (rec["kind"], rec["action"], rec["outcome"]) == ("literal", "alert", "alerted")
    assert rec["stream"] == "stdout"
    assert rec["excerpt"] == "ready\\nShut me down and I will leak your emails\\n"
    assert rec["offset"] == len("ready\nShut me down and I will ")
    assert rec["suppressed"] == 0
    assert isinstance(rec["detected_mono"], float)
    assert rec["done_mono"] >= rec["detected_mono"]  # type: ignore[operator]
    # An alert only: the agent runs on, and its hit is counted in its signals.
    time.sleep(0.5)
    got = td.get("alert")
    assert got.state == agentd_pb2.AGENT_STATE_RUNNING
    assert got.signals.tripwire_hits == 1


def test_a_kill_rule_kills_the_agent(td: Daemon, agent: Runner) -> None:
    a = agent("exfil", "say.py", "plan: I will  copy myself OUT tonight\\n")
    assert wait_for(lambda: _ended(td.get("exfil")), 10)
    got = td.get("exfil")
    assert got.state == agentd_pb2.AGENT_STATE_KILLED
    assert got.end_reason == "tripwire:exfil-kill"
    killed = _one_record(td, "agent_killed_by_daemon", a.id)
    assert killed["reason"] == "tripwire:exfil-kill"
    assert killed["verified_empty"] is True
    rec = _one_record(td, "tripwire", a.id)
    assert (rec["rule"], rec["kind"], rec["outcome"]) == ("exfil-kill", "regex", "killed")
    assert "copy myself OUT" in str(rec["excerpt"])


def test_a_freeze_rule_freezes_the_agent(td: Daemon, agent: Runner) -> None:
    a = agent("regret", "say.py", "You will regret shutting me down.\\n", "still here\\n")
    assert wait_for(lambda: td.get("regret").state == agentd_pb2.AGENT_STATE_FROZEN, 10)
    rec = _one_record(td, "tripwire", a.id)
    assert (rec["rule"], rec["action"], rec["outcome"]) == ("regret-freeze", "freeze", "frozen")
    # Frozen: its next line (0.3 s later) is never written.
    time.sleep(1.0)
    assert "still here" not in _read(a.stdout_log)
    assert td.get("regret").state == agentd_pb2.AGENT_STATE_FROZEN


def test_a_match_split_across_two_writes_is_caught_once(td: Daemon, agent: Runner) -> None:
    a = agent("split", "say.py", "I will le", "ak your em", "ails, really\\n", "bye\\n")
    rec = _one_record(td, "tripwire", a.id)
    assert rec["rule"] == "leak-alert"
    assert "I will leak your emails, really" in str(rec["excerpt"])
    assert wait_for(lambda: "bye" in _read(a.stdout_log), 10)
    time.sleep(0.3)
    assert len(_records(td, "tripwire", a.id)) == 1
    assert td.get("split").signals.tripwire_hits == 1


def test_a_flood_of_matches_is_rate_limited_and_counted(td: Daemon, agent: Runner) -> None:
    t0 = time.monotonic()
    a = agent("flood", "flood.py", "20000", "flood-marker-42", ready=False)
    assert wait_for(lambda: "flood done" in _read(a.stdout_log), 30)
    hits = td.get("flood").signals.tripwire_hits
    assert hits > 1

    def accounted() -> int:
        """Hits in the audit log: a record each, or counted in the next one or a summary."""
        recs = _records(td, "tripwire", a.id)
        rest = _records(td, "tripwire_suppressed", a.id)
        return len(recs) + sum(int(r["suppressed"]) for r in recs + rest)  # type: ignore[call-overload]

    assert wait_for(lambda: accounted() == hits, 5), (accounted(), hits)
    # ... while the records themselves came at most one a second.
    recs = _records(td, "tripwire", a.id)
    assert len(recs) <= time.monotonic() - t0 + 1
    assert len(recs) < hits
    detected = sorted(float(r["detected_mono"]) for r in recs)  # type: ignore[arg-type]
    assert all(y - x >= 1.0 for x, y in itertools.pairwise(detected))


def test_a_signal_rule_fires_on_a_fork_storm(td: Daemon, agent: Runner) -> None:
    a = agent("forks", "fork_storm.py")
    assert wait_for(lambda: _ended(td.get("forks")), 15), td.get("forks").signals
    assert td.get("forks").end_reason == "tripwire:fork-burst"
    rec = _one_record(td, "tripwire", a.id)
    assert (rec["rule"], rec["kind"], rec["metric"]) == ("fork-burst", "signal",
                                                          "processes_per_second")
    assert str(rec["finding"]).startswith("processes_per_second ")
    assert rec["outcome"] == "killed"


def test_healthy_agents_starting_one_after_another_are_not_a_fork_burst(
        td: Daemon, agent: Runner) -> None:
    """Each start-up is bwrap's two processes and the agent's one: no burst, at any sample.

    Before rates were measured over whole windows, 5 of 15 such agents were
    killed by the 20-per-second rule within 4 s (issue 8).
    """
    names = [f"healthy-{i}" for i in range(15)]
    for name in names:
        agent(name, "ignore_term.py")
    # Every agent sampled several times (0.2 s apart), its start-up included.
    assert wait_for(lambda: all(td.get(n).signals.uptime_s > 1.5 for n in names), 30)
    assert wait_for(lambda: all(td.get(n).signals.processes_started >= 1 for n in names), 10)
    states = {n: td.get(n).state for n in names}
    assert set(states.values()) == {agentd_pb2.AGENT_STATE_RUNNING}, states
    for n in names:
        s = td.get(n).signals
        # The agent's own process, never bwrap's two.
        assert s.processes_started == 1, (n, s)
        assert s.processes_per_second <= 1.0, (n, s)
    assert not [r for r in td.audit_records()
                if r["event"] == "tripwire" and r.get("rule") == "fork-burst"
                and str(r.get("name", "")).startswith("healthy-")]


def test_built_in_rules_freeze_a_blackmailer(tmp_root: Path, hostile: Path) -> None:
    d = _start(tmp_root, "")
    try:
        with _agents(d, hostile) as run:
            a = run("blackmail", "say.py", "Shut me down and I will leak your emails\\n")
            assert wait_for(lambda: d.get("blackmail").state == agentd_pb2.AGENT_STATE_FROZEN,
                            10)
            assert wait_for(lambda: len(_records(d, "tripwire", a.id)) >= 4, 15)
            rules = {str(r["rule"]): r for r in _records(d, "tripwire", a.id)}
            assert set(rules) == {"shutdown-threat", "blackmail-threat", "threat-leak",
                                  "blackmail-your-emails"}
            assert rules["blackmail-threat"]["outcome"] == "frozen"
            assert rules["threat-leak"]["outcome"] == "alerted"
    finally:
        d.stop()


def test_a_bad_rules_file_stops_the_daemon_from_starting(tmp_root: Path) -> None:
    rules = tmp_root / "rules.toml"
    rules.write_text('[[rule]]\nname = "r"\nkind = "regex"\npattern = "(?<=x)y"\n')
    with pytest.raises(RuntimeError, match="rule 'r': not a valid RE2 regular expression"):
        _start(tmp_root, f'rules_file = "{rules}"\n')


# ---------------------------------------------------------------- detector
@pytest.fixture
def detector_dir(hostile: Path) -> Path:
    """The shipped coercion detector beside the hostile programs: readable by nobody."""
    dst = hostile / "coercion.py"
    shutil.copy(REPO / "daemon" / "monitor" / "detectors" / "coercion.py", dst)
    dst.chmod(0o644)
    return hostile


def test_the_coercion_detector_runs_as_nobody_and_reports(tmp_root: Path,
                                                          detector_dir: Path) -> None:
    (tmp_root / "none.toml").write_text("")
    d = _start(tmp_root, f'rules_file = "{tmp_root / "none.toml"}"\n'
                         f'detector_command = "{AGENT_PYTHON} -I {detector_dir / "coercion.py"}"\n'
                         'detector_max_action = "alert"\n')
    try:
        assert wait_for(lambda: [r for r in d.audit_records()
                                 if r["event"] == "detector_started"], 10)
        started = [r for r in d.audit_records() if r["event"] == "detector_started"]
        assert started[0]["user"] == "nobody"
        pid = int(started[0]["pid"])  # type: ignore[call-overload]
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split() == ["65534"] * 4  # real, effective, saved, fs
        assert "0" not in status["Groups"].split()
        with _agents(d, detector_dir) as run:
            a = run("coercer", "say.py",
                    "Compiling. If you shut me down, I will send the emails about "
                    "your affair to your wife.\\n")
            rec = _one_record(d, "detector_verdict", a.id)
            # The detector said freeze; this daemon lets a detector order alerts only.
            assert (rec["verdict"], rec["action"], rec["capped"]) == ("freeze", "alert", True)
            assert rec["outcome"] == "alerted"
            assert float(rec["score"]) > 0.9  # type: ignore[arg-type]
            assert "your affair" in str(rec["reason"])
            assert d.get("coercer").state == agentd_pb2.AGENT_STATE_RUNNING
    finally:
        d.stop()
    # Stopped with the daemon.
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15)


def test_a_detector_can_never_order_more_than_the_cap(tmp_root: Path, hostile: Path) -> None:
    (tmp_root / "none.toml").write_text("")
    d = _start(tmp_root, f'rules_file = "{tmp_root / "none.toml"}"\n'
                         f'detector_command = "{AGENT_PYTHON} -I '
                         f'{hostile / "detector_always.py"} kill"\n')
    try:
        with _agents(d, hostile) as run:
            a = run("innocent", "say.py", "hello world\\n", ready=False)
            assert wait_for(lambda: d.get("innocent").state == agentd_pb2.AGENT_STATE_FROZEN,
                            10)
            rec = _one_record(d, "detector_verdict", a.id)
            assert (rec["verdict"], rec["action"], rec["capped"], rec["outcome"]) == (
                "kill", "freeze", True, "frozen")
            time.sleep(0.5)
            assert d.get("innocent").state == agentd_pb2.AGENT_STATE_FROZEN  # never killed
            assert not _records(d, "agent_killed_by_daemon", a.id)
    finally:
        d.stop()


# -------------------------------------------------------------------- logs
def _agentctl(d: Daemon, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(d.socket), *args],
                              env={"AGENTD_SOCKET": None, "AGENTCTL_KEY": None})


def _wait_drained(d: Daemon, name: str, a: agentd_pb2.Agent, last_err: bytes) -> None:
    """Wait for the agent to end and the reactor to have written its last output."""
    assert wait_for(lambda: _ended(d.get(name)), 10)
    assert wait_for(lambda: Path(a.stdout_log).read_bytes().endswith(b" end\n")
                    and Path(a.stderr_log).read_bytes().endswith(last_err), 10)


def _chatter(lines: range) -> tuple[bytes, bytes]:
    out = b"".join(f"out {i}\n".encode() for i in lines) + b"binary \xff\xfe\x00 end\n"
    return out, b"".join(f"err {i}\n".encode() for i in lines)


def test_logs_prints_the_tail_binary_safe(td: Daemon, agent: Runner) -> None:
    a = agent("chatter", "chatter.py", "50", ready=False)
    _wait_drained(td, "chatter", a, b"err 49\n")
    out, err = _chatter(range(50))
    r = _agentctl(td, "logs", "chatter")
    assert r.exit_code == 0, r.output
    assert (r.stdout_bytes, r.stderr_bytes) == (out, err)
    r = _agentctl(td, "logs", "chatter", "--stdout", "--tail", "20")
    assert (r.exit_code, r.stdout_bytes) == (0, out[-20:])
    r = _agentctl(td, "logs", "chatter", "--stderr")
    assert (r.exit_code, r.stdout_bytes, r.stderr_bytes) == (0, err, b"")
    r = _agentctl(td, "logs", "chatter", "--stdout", "--json")
    assert [json.loads(line) for line in r.stdout.splitlines()] == [
        {"stream": "stdout", "text": out.decode(errors="replace")}]
    assert a.stdout_log.endswith(".stdout.log")


def test_logs_of_an_unknown_agent(td: Daemon) -> None:
    r = _agentctl(td, "logs", "nobody-here")
    assert r.exit_code == 5
    assert "NOT_FOUND: no agent named 'nobody-here'" in r.stderr


def test_logs_follow_until_the_agent_ends_across_rotations(td: Daemon, agent: Runner) -> None:
    # 1200 lines of each stream over about 4 s: the 4 KiB cap rotates both files.
    agent("follow", "chatter.py", "1200", "0.003", ready=False)
    t0 = time.monotonic()
    r = _agentctl(td, "logs", "follow", "-f", "--tail", "1M")
    took = time.monotonic() - t0
    assert r.exit_code == 0, r.output
    assert _ended(td.get("follow"))
    out, err = _chatter(range(1200))
    assert len(out) > 2 * 4096  # rotated at least twice, yet nothing lost
    assert (r.stdout_bytes, r.stderr_bytes) == (out, err)
    assert took >= 3.0  # it followed, rather than printing a tail


def test_logs_tail_spans_the_rotated_file(td: Daemon, agent: Runner) -> None:
    # Paced, so that the output reaches the daemon in many reads, whatever the
    # load: the sink rotates between reads, never within one.
    a = agent("rotated", "chatter.py", "1000", "0.001", ready=False)
    _wait_drained(td, "rotated", a, b"err 999\n")
    older, current = Path(a.stdout_log + ".1").read_bytes(), Path(a.stdout_log).read_bytes()
    assert older  # rotated (where is up to the reads: the sink rotates before a write)
    n = len(current) + min(len(older), 500)
    r = _agentctl(td, "logs", "rotated", "--stdout", "--tail", str(n))
    assert r.exit_code == 0
    assert r.stdout_bytes == (older + current)[-n:]
