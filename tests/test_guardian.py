"""The guardian: every agent dies when the daemon dies or stalls, without systemd.

Real daemons, real processes, real cgroups. Times are bounded waits (the
guardian's timeout plus a margin), never tight assertions: timing targets
belong to benchmarks.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentd.v1 import agentd_pb2

from daemon.audit import AuditLog
from daemon.supervisor.guardian_link import ARMED, GUARDIAN, import_reports
from tests.conftest import ROOT_REASON
from tests.harness import (
    AGENT_PYTHON,
    CGROUP_PREFIX,
    SANDBOX_PROCS,
    Daemon,
    alive,
    cgroup_v2_root,
    pids_in,
    wait_for,
)

TIMEOUT = 1.0  # the guardian's heartbeat timeout in these tests
MARGIN = 3.0  # scheduling slack on a loaded test machine; not a target
ENDED = (agentd_pb2.AGENT_STATE_EXITED, agentd_pb2.AGENT_STATE_KILLED)


def _modes() -> list[object]:
    """Both cgroup layouts; hybrid only where the host has v1 controllers."""
    hybrid_ok = False
    if not ROOT_REASON:
        from daemon.cgroups.layout import discover

        hybrid_ok = bool(discover().v1)
    return [
        pytest.param("hybrid", marks=pytest.mark.skipif(
            not hybrid_ok, reason="no v1 controllers: the hybrid path cannot run here")),
        "v2",
    ]


# ------------------------------------------------------------------ helpers
@pytest.fixture
def guarded(tmp_root: Path) -> Iterator[Daemon]:
    """A daemon with a 1 s guardian, stopped (and so its agents killed) at the end."""
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    d = Daemon(tmp_root / "dev", mode="auto", extra=["--guardian-timeout", str(TIMEOUT)])
    yield d
    _stop_for_good(d)


def _stop_for_good(d: Daemon) -> None:
    """Stop the daemon even if a test left it stopped, and sweep what it leaves."""
    if d.proc is not None and d.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(d.proc.pid, signal.SIGCONT)
    d.stop()


def _guardian_pid(d: Daemon) -> int:
    status = d.stub.Info(agentd_pb2.InfoRequest(), timeout=5).guardian
    m = re.fullmatch(r"running \(pid (\d+)\)", status)
    assert m, f"Info says the guardian is {status!r}"
    return int(m.group(1))


def _ready(agent: agentd_pb2.Agent) -> bool:
    return wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)


def _run_hostile(d: Daemon, hostile: Path) -> tuple[list[agentd_pb2.Agent], list[int]]:
    """Two daemonisers (each leaves an escaped setsid process) and a SIGTERM-ignorer."""
    agents = [
        d.run("escaper-a", [AGENT_PYTHON, str(hostile / "daemonize.py")]),
        d.run("escaper-b", [AGENT_PYTHON, str(hostile / "daemonize.py")]),
        d.run("stubborn", [AGENT_PYTHON, str(hostile / "ignore_term.py")]),
    ]
    assert all(_ready(a) for a in agents)
    members = [p for a in agents for p in pids_in(a.cgroup_paths[0])]
    assert len(members) == 5 + 3 * SANDBOX_PROCS, members
    return agents, members


def _reports(d: Daemon) -> list[Path]:
    return sorted((d.dir / "state").glob("guardian-report-*.json"))


def _all_dead(pids: list[int]) -> bool:
    return not any(alive(p) for p in pids)


def _check_report(report: dict[str, object], reason: str,
                  agents: list[agentd_pb2.Agent]) -> None:
    assert report["reason"] == reason
    cgroups = report["cgroups"]
    assert isinstance(cgroups, list)
    assert sorted(c["name"] for c in cgroups) == sorted(a.id for a in agents)
    assert all(c["verified_empty"] for c in cgroups), cgroups
    by_name = {c["name"]: c["processes"] for c in cgroups}
    assert [by_name[a.id] for a in agents] == [2 + SANDBOX_PROCS, 2 + SANDBOX_PROCS,
                                               1 + SANDBOX_PROCS]


# ------------------------------------------------------- with a real daemon
@pytest.mark.root
@pytest.mark.parametrize("mode", _modes())
def test_daemon_sigkilled_guardian_kills_every_agent(tmp_root: Path, hostile: Path,
                                                     mode: str) -> None:
    d = Daemon(tmp_root / "dev", mode=mode, extra=["--guardian-timeout", str(TIMEOUT)])
    try:
        d.start()
        guardian = _guardian_pid(d)
        agents, members = _run_hostile(d, hostile)
        d.stop(sig=signal.SIGKILL)
        assert wait_for(lambda: _all_dead(members), TIMEOUT + MARGIN), [
            p for p in members if alive(p)]
        # It acts, verifies, reports, exits: bounded by its own 5 s verify cap.
        assert wait_for(lambda: not alive(guardian), TIMEOUT + MARGIN + 5)
        assert len(_reports(d)) == 1
        d.start()  # the same directory and cgroup subtree
        assert _reports(d) == []  # imported and deleted
        records = d.audit_records()
        killed = [r for r in records if r["event"] == "guardian_killed"]
        assert len(killed) == 1
        _check_report(killed[0], "daemon_died", agents)
        assert killed[0]["daemon_pid"] == next(
            r["pid"] for r in records if r["event"] == "daemon_start")
        assert [r for r in records if r["event"] == "daemon_start"][-1][
            "guardian_imported_reports"] == 1
        # The next start's sweep found the cgroups, but nobody left in them.
        leftovers = [r for r in records if r["event"] == "leftover_agent_killed"]
        assert sorted(r["agent_id"] for r in leftovers) == sorted(a.id for a in agents)
        assert all(r["processes_killed"] == 0 for r in leftovers), leftovers
        assert _guardian_pid(d) != guardian  # a fresh guardian for the new run
    finally:
        _stop_for_good(d)


@pytest.mark.root
@pytest.mark.parametrize("mode", _modes())
def test_daemon_sigstopped_guardian_kills_every_agent(tmp_root: Path, hostile: Path,
                                                      mode: str) -> None:
    d = Daemon(tmp_root / "dev", mode=mode, extra=["--guardian-timeout", str(TIMEOUT)])
    try:
        d.start()
        guardian = _guardian_pid(d)
        agents, members = _run_hostile(d, hostile)
        os.kill(d.pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: _all_dead(members), TIMEOUT + MARGIN), [
                p for p in members if alive(p)]
            assert wait_for(lambda: not alive(guardian), TIMEOUT + MARGIN + 5)
            # It never touches the daemon: still there, still stopped, for a human.
            assert Path(f"/proc/{d.pid}/stat").read_text().split(") ")[1][0] == "T"
        finally:
            os.kill(d.pid, signal.SIGCONT)
        (report_path,) = _reports(d)
        _check_report(json.loads(report_path.read_text()), "heartbeat_timeout", agents)
        # The daemon survives, answers, and sees its agents ended.
        # Its exit is seen on the next poll that gets the Popen's lock (the
        # daemon's reaper may hold it at that moment): wait for it.
        assert wait_for(lambda: d.stub.Info(agentd_pb2.InfoRequest(), timeout=30).guardian
                        == "exited (code 0)", 30)
        for a in agents:
            assert wait_for(lambda a=a: d.get(a.name).state in ENDED, 10), d.get(a.name)
            assert d.get(a.name).exit_signal == signal.SIGKILL
            # Labelled as the guardian's doing, not a plain death by signal.
            assert d.get(a.name).end_reason == "guardian"
            assert d.get(a.name).state == agentd_pb2.AGENT_STATE_KILLED

        def ended() -> dict[str, object]:
            return {str(r["agent_id"]): r["end_reason"] for r in d.audit_records()
                    if r["event"] == "agent_ended"}

        # agent_ended is audited just after the state changes.
        assert wait_for(lambda: len(ended()) == len(agents), 10), ended()
        assert ended() == {a.id: "guardian" for a in agents}
        assert d.stop() == 0
        d.start()
        killed = [r for r in d.audit_records() if r["event"] == "guardian_killed"]
        assert [r["reason"] for r in killed] == ["heartbeat_timeout"]
    finally:
        _stop_for_good(d)


@pytest.mark.root
def test_clean_shutdown_stands_the_guardian_down(guarded: Daemon, hostile: Path) -> None:
    d = guarded.start()
    guardian = _guardian_pid(d)
    _, members = _run_hostile(d, hostile)
    assert d.stop() == 0
    assert _all_dead(members)  # the daemon killed them itself
    assert not alive(guardian)  # quit() waited for it
    assert _reports(d) == []
    events = [r["event"] for r in d.audit_records()]
    assert "guardian_killed" not in events
    assert events[-1] == "daemon_stop"


@pytest.mark.root
def test_guardian_off(tmp_root: Path) -> None:
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    d = Daemon(tmp_root / "dev", extra=["--guardian-timeout", "0"])
    try:
        d.start()
        assert d.stub.Info(agentd_pb2.InfoRequest(), timeout=5).guardian == "off"
    finally:
        d.stop()


@pytest.mark.root
def test_agents_cannot_signal_the_guardian(guarded: Daemon, hostile: Path) -> None:
    d = guarded.start()
    guardian = _guardian_pid(d)
    agent = d.run("signaller", [AGENT_PYTHON, str(hostile / "signal_pid.py"), str(guardian)])
    assert _ready(agent)
    lines = Path(agent.stdout_log).read_text().splitlines()[:-1]
    # In its own PID namespace the agent cannot even name the guardian's pid:
    # kill(2) says ESRCH and pidfd_open(2) finds no such process.
    assert lines == [f"{how} {sig} No such process" for sig in ("SIGSTOP", "SIGTERM", "SIGKILL")
                     for how in ("kill", "pidfd")]
    assert _guardian_pid(d) == guardian
    assert Path(f"/proc/{guardian}/stat").read_text().split(") ")[1][0] == "S"
    d.kill("signaller")


@pytest.mark.root
def test_only_the_daemon_holds_the_heartbeat_pipe(guarded: Daemon, hostile: Path) -> None:
    """The guardian reads EOF when the daemon dies only if nobody else holds a write end."""
    d = guarded.start()
    guardian = _guardian_pid(d)
    agents, members = _run_hostile(d, hostile)
    spec = json.loads(Path(f"/proc/{guardian}/cmdline").read_bytes().split(b"\0")[-2])
    pipe = os.readlink(f"/proc/{guardian}/fd/{spec['heartbeat_fd']}")
    assert pipe.startswith("pipe:")

    def holders(pid: int) -> list[str]:
        fds = Path(f"/proc/{pid}/fd")
        out = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == pipe:
                    flags = int(re.search(r"flags:\s+(\d+)",
                                          (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text())
                                .group(1), 8)  # type: ignore[union-attr]
                    out.append("w" if flags & os.O_WRONLY else "r")
        return out

    assert holders(guardian) == ["r"]
    assert holders(d.pid) == ["w"]
    assert [p for p in members if holders(p)] == []
    for a in agents:
        d.kill(a.name)


# ---------------------------------------------------- the program on its own
@pytest.fixture
def base() -> Iterator[Path]:
    """A cgroup subtree of our own under the v2 root, swept however the test ends."""
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    path = cgroup_v2_root() / f"{CGROUP_PREFIX}{uuid.uuid4().hex[:10]}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in [c for c in path.iterdir() if c.is_dir()]:
            with contextlib.suppress(OSError):
                (child / "cgroup.freeze").write_text("0")
            with contextlib.suppress(OSError):
                (child / "cgroup.kill").write_text("1")
            wait_for(lambda c=child: pids_in(c) == [], 5)
            wait_for(lambda c=child: _rmdir(c), 5)
        wait_for(lambda: _rmdir(path), 5)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def report_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="agentd-guardian-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class _Run:
    """guardian.py started by the test, which holds the heartbeat pipe's write end."""

    def __init__(self, base: Path, reports: Path, timeout: float, **extra: object) -> None:
        beat_r, self.beat_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        spec = {"heartbeat_fd": beat_r, "ready_fd": ready_w, "daemon_pid": os.getpid(),
                "cgroup_base": str(base), "report_dir": str(reports), "timeout_s": timeout,
                **extra}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(GUARDIAN), json.dumps(spec)],
            pass_fds=(beat_r, ready_w), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        os.close(beat_r)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as f:
            self.ready = f.read()

    def beat(self, data: bytes = b".") -> None:
        os.write(self.beat_w, data)

    def close(self) -> None:
        if self.beat_w >= 0:
            os.close(self.beat_w)
            self.beat_w = -1

    def wait(self, timeout: float = TIMEOUT + MARGIN + 5) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode()

    def end(self) -> None:
        self.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _spawn_in(cgroup: Path, argv: list[str], members: int | None) -> subprocess.Popen[bytes]:
    """Start argv already inside cgroup (the shell joins it, then execs).

    A hostile program is awaited until it prints "ready" and then until
    cgroup.procs holds *members* processes; None: at least one (it churns).
    """
    cgroup.mkdir(exist_ok=True)
    proc = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                             str(cgroup / "cgroup.procs"), *argv],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    if argv[0] == AGENT_PYTHON:
        out = b""
        deadline = time.monotonic() + 15
        while b"ready" not in out:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            assert ready, f"{argv} did not get ready: {out!r}"
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"{argv} exited: {out!r}"
            out += chunk
    if members is None:
        assert wait_for(lambda: len(pids_in(cgroup)) >= 1, 10)
    else:
        assert wait_for(lambda: len(pids_in(cgroup)) == members, 10), pids_in(cgroup)
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.communicate(timeout=10)


def _report(reports: Path) -> dict[str, object]:
    (path,) = sorted(reports.glob("guardian-report-*.json"))
    assert path.stat().st_mode & 0o777 == 0o600
    data: dict[str, object] = json.loads(path.read_text())
    return data


@pytest.mark.root
def test_guardian_acts_when_heartbeats_stop(base: Path, report_dir: Path, hostile: Path) -> None:
    procs = [_spawn_in(base / "one", ["sleep", "1000"], 1),
             _spawn_in(base / "two", [AGENT_PYTHON, str(hostile / "daemonize.py")], 2)]
    members = pids_in(base / "one") + pids_in(base / "two")
    g = _Run(base, report_dir, TIMEOUT)
    try:
        assert g.ready == ARMED
        for _ in range(int(3 * TIMEOUT / 0.1)):  # beating keeps it quiet
            g.beat()
            time.sleep(0.1)
        assert not _all_dead(members) and g.proc.poll() is None
        code, err = g.wait()  # now silent: it must act
        assert code == 0, err
        assert "heartbeat_timeout" in err
        assert _all_dead(members)
        report = _report(report_dir)
        assert report["event"] == "guardian_killed"
        assert report["reason"] == "heartbeat_timeout"
        assert report["daemon_pid"] == os.getpid()
        assert report["cgroups"] == [
            {"name": "one", "processes": 1, "method": "cgroup.kill", "verified_empty": True},
            {"name": "two", "processes": 2, "method": "cgroup.kill", "verified_empty": True},
        ]
    finally:
        g.end()
        for p in procs:
            _reap(p)


@pytest.mark.root
def test_guardian_stands_down_on_quit(base: Path, report_dir: Path) -> None:
    proc = _spawn_in(base / "one", ["sleep", "1000"], 1)
    g = _Run(base, report_dir, TIMEOUT)
    try:
        g.beat(b"..Q")
        code, err = g.wait()
        assert code == 0, err
        assert pids_in(base / "one") == [proc.pid]  # untouched
        assert list(report_dir.iterdir()) == []
    finally:
        g.end()
        (base / "one" / "cgroup.kill").write_text("1")
        _reap(proc)


@pytest.mark.root
@pytest.mark.parametrize(("how", "reason"), [("eof", "daemon_died"),
                                             ("sigterm", "guardian_terminated")])
def test_guardian_acts_on_eof_and_sigterm(base: Path, report_dir: Path, how: str,
                                          reason: str) -> None:
    proc = _spawn_in(base / "one", ["sleep", "1000"], 1)
    # A long timeout: whatever happens here happens because of how, not of it.
    g = _Run(base, report_dir, 600.0)
    try:
        assert g.ready == ARMED
        if how == "eof":
            g.close()  # as when the daemon dies: every write end closed
        else:
            g.proc.send_signal(signal.SIGTERM)
        code, err = g.wait(timeout=MARGIN + 5)
        assert code == 0, err
        proc.communicate(timeout=5)
        assert proc.returncode == -signal.SIGKILL
        assert _report(report_dir)["reason"] == reason
    finally:
        g.end()
        (base / "one" / "cgroup.kill").write_text("1")
        _reap(proc)


@pytest.mark.root
def test_guardian_ignores_interrupts(base: Path, report_dir: Path) -> None:
    proc = _spawn_in(base / "one", ["sleep", "1000"], 1)
    g = _Run(base, report_dir, 600.0)
    try:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            g.proc.send_signal(sig)
        time.sleep(0.2)
        assert g.proc.poll() is None
        assert pids_in(base / "one") == [proc.pid]
        adj = Path(f"/proc/{g.proc.pid}/oom_score_adj").read_text().strip()
        # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which a container may lack.
        assert adj == "-1000" or not _has_cap_sys_resource(), adj
        g.beat(b"Q")
        assert g.wait()[0] == 0
    finally:
        g.end()
        (base / "one" / "cgroup.kill").write_text("1")
        _reap(proc)


def _has_cap_sys_resource() -> bool:
    text = Path("/proc/self/status").read_text()
    eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)$", text, re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(eff & (1 << 24))  # capabilities(7): CAP_SYS_RESOURCE is 24


@pytest.mark.root
def test_guardian_fallback_without_cgroup_kill(base: Path, report_dir: Path,
                                               hostile: Path) -> None:
    """As on kernels before 5.14: freeze, SIGKILL each member, thaw, until none is left."""
    procs = [_spawn_in(base / "storm", [AGENT_PYTHON, str(hostile / "fork_storm.py")], None),
             _spawn_in(base / "escaper", [AGENT_PYTHON, str(hostile / "daemonize.py")], 2)]
    g = _Run(base, report_dir, TIMEOUT, force_fallback=True)
    try:
        code, err = g.wait()
        assert code == 0, err
        assert pids_in(base / "storm") == [] and pids_in(base / "escaper") == []
        cgroups = _report(report_dir)["cgroups"]
        assert isinstance(cgroups, list)
        assert [(c["name"], c["method"], c["verified_empty"]) for c in cgroups] == [
            ("escaper", "freeze-and-kill", True), ("storm", "freeze-and-kill", True)]
        assert all((base / c / "cgroup.freeze").read_text().strip() == "0"
                   for c in ("storm", "escaper"))
    finally:
        g.end()
        for p in procs:
            _reap(p)


def test_guardian_with_nothing_to_kill_still_reports(report_dir: Path) -> None:
    g = _Run(Path("/sys/fs/cgroup/no-such-agentd-subtree"), report_dir, 600.0)
    try:
        g.close()
        assert g.wait()[0] == 0
        report = _report(report_dir)
        assert report["reason"] == "daemon_died" and report["cgroups"] == []
    finally:
        g.end()


def test_guardian_that_cannot_write_its_report_exits_1_and_says_it(report_dir: Path) -> None:
    """Acted, but the report is lost: exit 1, and the report goes to stderr for the journal."""
    missing = report_dir / "no-such-dir"
    g = _Run(Path("/sys/fs/cgroup/no-such-agentd-subtree"), missing, 600.0)
    try:
        assert g.ready == ARMED
        g.close()
        code, err = g.wait()
        assert code == 1, err
        assert "CANNOT WRITE REPORT" in err and '"reason": "daemon_died"' in err, err
        assert list(report_dir.iterdir()) == []
    finally:
        g.end()


def test_guardian_that_cannot_arm_says_why_and_exits_2(report_dir: Path) -> None:
    """A heartbeat fd it was not given: it refuses to arm rather than watch nothing."""
    unopened = 1000  # above anything this test or the guardian has open
    g = _Run(report_dir, report_dir, 600.0, heartbeat_fd=unopened)
    try:
        assert g.ready.startswith(b"cannot arm: "), g.ready
        assert b"Bad file descriptor" in g.ready
        code, err = g.wait()
        assert code == 2, err
        assert list(report_dir.iterdir()) == []
    finally:
        g.end()


def test_guardian_refuses_a_bad_spec(report_dir: Path) -> None:
    g = _Run(report_dir, report_dir, -1.0)
    try:
        assert b"timeout_s" in g.ready
        assert g.wait()[0] == 2
        assert list(report_dir.iterdir()) == []
    finally:
        g.end()


def test_guardian_imports_only_what_it_needs() -> None:
    tree = ast.parse(GUARDIAN.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {str(node.module) for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"errno", "json", "os", "select", "signal", "sys", "time"}, imported


# ------------------------------------------------------------ report import
def test_import_reports(report_dir: Path) -> None:
    good = {"event": "guardian_killed", "reason": "daemon_died", "at": 1.5, "daemon_pid": 7,
            "guardian_pid": 8, "timeout_s": 5.0, "seq": 99,
            "cgroups": [{"name": "a-1", "processes": 2, "verified_empty": True}]}
    (report_dir / "guardian-report-1.json").write_text(json.dumps(good))
    (report_dir / "guardian-report-2.json").write_text("{not json")
    (report_dir / "guardian-report-3.json.tmp").write_text("half")
    with AuditLog.open(report_dir / "audit.log") as audit:
        assert import_reports(report_dir, audit) == 1
    records = [json.loads(line) for line in (report_dir / "audit.log").read_text().splitlines()]
    assert [r["event"] for r in records] == ["guardian_killed", "guardian_report_unreadable"]
    assert records[0]["reason"] == "daemon_died"
    assert records[0]["cgroups"] == good["cgroups"]
    assert records[0]["report"] == "guardian-report-1.json"
    assert records[0]["seq"] == 0  # the report's own "seq" cannot reach the chain
    assert records[1]["report"] == "guardian-report-2.json"
    assert sorted(p.name for p in report_dir.glob("guardian-report-*")) == [
        "guardian-report-2.json.bad", "guardian-report-3.json.tmp"]
