"""The daemon's own life: start-up, shutdown, leftovers, the socket, bad input, stuck tasks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from tests.harness import (
    AGENT_PYTHON,
    HOSTILE_PARENT,
    SANDBOX_PROCS,
    Daemon,
    alive,
    pids_in,
    wait_for,
)

pytestmark = pytest.mark.root


def _ready(agent: agentd_pb2.Agent) -> bool:
    return wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)


def test_sigterm_to_the_daemon_kills_every_agent(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    agents = [d.run(f"a{i}", [AGENT_PYTHON, str(hostile / "daemonize.py")]) for i in range(3)]
    assert all(_ready(a) for a in agents)
    members = [p for a in agents for p in pids_in(a.cgroup_paths[0])]
    assert len(members) == 3 * (2 + SANDBOX_PROCS)
    assert d.stop() == 0
    assert [p for p in members if alive(p)] == []
    events = [r["event"] for r in d.audit_records()]
    assert events.count("agent_killed_at_shutdown") == 3
    assert events[-1] == "daemon_stop"


def test_leftovers_of_a_dead_daemon_are_killed_at_start(fresh_daemon: Daemon,
                                                        hostile: Path) -> None:
    """With the guardian off, kill -9 of the daemon leaves agents running; the next start
    kills them, audits it, and never re-adopts them."""
    d = fresh_daemon
    # The guardian would kill the agents as soon as the daemon dies; this test
    # is about the second line of defence, the sweep at start-up.
    d.stop()
    d.extra.extend(["--guardian-timeout", "0"])
    d.start()
    agent = d.run("orphan", [AGENT_PYTHON, str(hostile / "daemonize.py")])
    assert _ready(agent)
    members = pids_in(agent.cgroup_paths[0])
    d.stop(sig=signal.SIGKILL)
    d.start()
    assert [p for p in members if alive(p)] == []
    assert not Path(agent.cgroup_paths[0]).exists()
    leftover = [r for r in d.audit_records() if r["event"] == "leftover_agent_killed"]
    assert leftover and leftover[-1]["agent_id"] == agent.id
    assert leftover[-1]["processes_killed"] == 2 + SANDBOX_PROCS
    with pytest.raises(grpc.RpcError) as exc:
        d.get("orphan")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_control_socket_modes(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    sock = os.stat(d.socket)
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o660
    assert stat.S_IMODE(os.stat(d.socket.parent).st_mode) == 0o750
    assert sock.st_uid == 0


def test_root_agents_refused_by_default(fresh_daemon: Daemon, hostile: Path) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        fresh_daemon.run("as-root", [AGENT_PYTHON, str(hostile / "ignore_term.py")],
                         user="root")
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "root" in (exc.value.details() or "")


@pytest.mark.parametrize(
    ("name", "argv", "code", "words"),
    [
        ("../escape", ["/bin/true"], grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ("UPPER", ["/bin/true"], grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ("empty-argv", [], grpc.StatusCode.INVALID_ARGUMENT, "no command"),
        ("nul", ["/bin/echo", "a\0b"], grpc.StatusCode.INVALID_ARGUMENT, "NUL"),
        ("missing", ["/no/such/program"], grpc.StatusCode.FAILED_PRECONDITION, "exec"),
    ],
)
def test_bad_run_requests_get_clear_errors(fresh_daemon: Daemon, name: str, argv: list[str],
                                           code: grpc.StatusCode, words: str) -> None:
    d = fresh_daemon
    with pytest.raises(grpc.RpcError) as exc:
        d.run(name, argv)
    assert exc.value.code() == code
    assert words in (exc.value.details() or ""), exc.value.details()
    assert d.stub.Info(agentd_pb2.InfoRequest(), timeout=30).host_id  # still serving
    _assert_no_agent_cgroups(d)


def _assert_no_agent_cgroups(d: Daemon) -> None:
    """No agent cgroup in the daemon's subtree, in any hierarchy.

    The subtree is derived from the daemon's cgroup name, not from what the
    daemon lists: a cgroup it forgot would not be listed.
    """
    from daemon.cgroups.layout import discover
    from daemon.cgroups.tree import AgentTree

    tree = AgentTree(discover(d.mode), d.cgroup_name)
    for base in (tree.base_v2, *tree.base_v1.values()):
        assert base.is_dir(), f"the daemon's subtree {base} does not exist"
        assert [p.name for p in base.iterdir() if p.is_dir()] == [], base


def test_a_launch_that_fails_after_its_cgroup_is_made_leaves_none(fresh_daemon: Daemon) -> None:
    """The entrypoint passes the pin (root can read it) but the agent's user cannot exec it."""
    d = fresh_daemon
    with tempfile.NamedTemporaryFile("w", dir=HOSTILE_PARENT, suffix=".sh",
                                     delete=False) as f:
        f.write("#!/bin/sh\nexit 0\n")
    try:
        os.chmod(f.name, 0o700)  # root's alone
        with pytest.raises(grpc.RpcError) as exc:
            d.run("not-for-you", [f.name])
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value.details()
        assert "did not start" in (exc.value.details() or ""), exc.value.details()
    finally:
        os.unlink(f.name)
    _assert_no_agent_cgroups(d)


def test_unknown_agent(fresh_daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        fresh_daemon.kill("nobody-here")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert "agentctl ps" in (exc.value.details() or "")


def test_name_in_use(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    d.run("twin", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    with pytest.raises(grpc.RpcError) as exc:
        d.run("twin", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    d.kill("twin")
    # An ended agent's name can be used again.
    d.run("twin", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    d.kill("twin")


def test_kernel_facts_in_status(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    agent = d.run("facts", [AGENT_PYTHON, str(hostile / "daemonize.py")], memory=64 << 20)
    assert _ready(agent)
    status = d.get("facts")
    assert sorted(status.pids) == sorted(pids_in(agent.cgroup_paths[0]))
    assert status.main_pid in status.pids
    assert status.memory_bytes > 0
    # The default profile's dynamic user: a fresh uid from the reserved range.
    assert 61184 <= status.uid <= 65519 and status.user == f"dynamic:{status.uid}"
    assert Path(f"/proc/{status.main_pid}").stat().st_uid == status.uid
    assert status.started_at.seconds > 0
    assert status.state == agentd_pb2.AGENT_STATE_RUNNING
    d.kill("facts")
    ended = d.get("facts")
    assert ended.state == agentd_pb2.AGENT_STATE_KILLED
    assert wait_for(lambda: d.get("facts").HasField("exit_signal"), 15)
    assert d.get("facts").exit_signal == signal.SIGKILL


def test_exit_code_of_a_finished_agent(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    d.run("quick", ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert wait_for(lambda: d.get("quick").state == agentd_pb2.AGENT_STATE_EXITED, 10)
    status = d.get("quick")
    assert status.exit_code == 3
    assert Path(status.stdout_log).read_text() == "out\n"
    assert Path(status.stderr_log).read_text() == "err\n"
    result = d.kill("quick")
    assert result.already_ended


@pytest.mark.parametrize("mode", ["hybrid", "v2"])
def test_fallback_kill_without_cgroup_kill(tmp_root: Path, hostile: Path, mode: str) -> None:
    """Forced fallback (as on kernels before 5.14): freeze, SIGKILL each member, thaw, repeat."""
    from tests.conftest import start_daemon

    d = start_daemon(tmp_root, mode, extra=["--force-kill-fallback"])
    try:
        info = d.stub.Info(agentd_pb2.InfoRequest(), timeout=30)
        assert info.kill_method == "freeze-and-kill"
        agent = d.run("storm", [AGENT_PYTHON, str(hostile / "fork_storm.py")],
                      pids=128 if mode == "hybrid" else 0)
        assert _ready(agent)
        members = pids_in(agent.cgroup_paths[0])
        result = d.kill("storm")
        assert result.method == "freeze-and-kill", [
            r for r in d.audit_records() if r.get("agent_id") == agent.id]
        assert result.verified_empty
        assert pids_in(agent.cgroup_paths[0]) == []
        assert [p for p in members if alive(p)] == []
        agent = d.run("daemoniser", [AGENT_PYTHON, str(hostile / "daemonize.py")])
        assert _ready(agent)
        result = d.stop_agent("daemoniser", grace_ms=200)
        assert result.verified_empty and result.processes_killed == 2 + SANDBOX_PROCS
    finally:
        d.stop()


def test_the_fallback_kill_never_signals_a_pid_that_left_the_cgroup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Between reading cgroup.procs and the signal a pid may be reused outside the cgroup
    (the fallback's freeze is not waited for long). Such a read is simulated: pids() also
    names an outsider; the rest is the real kernel. Only members may be killed."""
    from daemon.cgroups.tree import FALLBACK_METHOD
    from tests.conftest import ROOT_REASON
    from tests.scratch_agents import ScratchAgents

    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    scratch = ScratchAgents()
    outsider = subprocess.Popen(["/bin/sleep", "600"])
    try:
        agent = scratch.spawn(["/bin/sleep", "600"], name="fallback")
        scratch.tree.has_cgroup_kill = False  # as on a kernel before 5.14
        group = agent.cgroup
        real = group.pids
        monkeypatch.setattr(group, "pids", lambda: [*real(), outsider.pid])
        assert group.kill() == FALLBACK_METHOD
        assert group.wait_empty(time.monotonic() + 30)
        assert agent.proc.wait(timeout=30) == -signal.SIGKILL
        assert outsider.poll() is None, "the fallback killed a process outside the cgroup"
        monkeypatch.undo()
    finally:
        outsider.kill()
        outsider.wait()
        scratch.close()


def test_stuck_process_is_reported_not_waited_on(tmp_root: Path, hostile: Path) -> None:
    """A task that cannot die yet (here: frozen by the v1 freezer, which leaves a killed task
    in D state until thawed) must not hang the daemon: the kill answers, names it, and the
    daemon notices once it finally goes."""
    from daemon.cgroups.layout import discover
    from tests.conftest import start_daemon

    layout = discover()
    if "freezer" not in layout.v1:
        pytest.skip("needs a v1 freezer hierarchy to make a task that ignores SIGKILL")
    d = start_daemon(tmp_root, "hybrid", extra=["--kill-verify-timeout", "0.5"])
    freezer = None
    try:
        agent = d.run("frozen", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
        assert _ready(agent)
        freezer = next(Path(p) for p in agent.cgroup_paths if "/freezer/" in p)
        (freezer / "freezer.state").write_text("FROZEN")
        assert wait_for(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", 15)
        result = d.kill("frozen")
        assert not result.verified_empty
        # The agent and its sandbox's two bwrap processes, all frozen.
        assert agent.main_pid in [s.pid for s in result.stuck]
        assert len(result.stuck) == 1 + SANDBOX_PROCS
        assert {s.state for s in result.stuck} == {"D"}
        assert d.stub.Info(agentd_pb2.InfoRequest(), timeout=30).host_id  # daemon responsive
        (freezer / "freezer.state").write_text("THAWED")
        assert wait_for(lambda: not alive(agent.main_pid), 15)
        assert wait_for(lambda: d.get("frozen").state == agentd_pb2.AGENT_STATE_KILLED, 15)
    finally:
        if freezer is not None and freezer.exists():
            (freezer / "freezer.state").write_text("THAWED")
        d.stop()


def test_every_stop_verifies_the_audit_chain(tmp_root: Path) -> None:
    """The harness checks each daemon's chain when it stops; breaking it needs an opt-out."""
    d = Daemon(tmp_root / "dev", verify_audit=False).start()
    assert d.stop() == 0
    d.check_audit_chain()  # what every other stop does
    lines = d.audit_log.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"daemon_start"', b'"daemon_stArt"')
    d.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AssertionError, match="does not verify"):
        d.check_audit_chain()


# ------------------------------------------------------- the dev directory
def _plant(case: str, d: Path, victim: Path) -> Path:
    """Make case's flaw in dev directory d; the path the error must name."""
    if case == "parent writable":
        d.parent.chmod(0o777)  # not sticky: anyone could swap d for their own
        return d.parent
    if case == "parent not root's":
        os.chown(d.parent, 65534, 65534)
        return d.parent
    if case == "dir writable":
        d.chmod(0o770)
        return d
    if case == "trusted_keys writable":
        (d / "trusted_keys").chmod(0o620)
        return d / "trusted_keys"
    if case == "agentd.toml not root's":
        (d / "agentd.toml").write_text('detector_command = "/bin/true"\n')
        os.chown(d / "agentd.toml", 65534, 65534)
        return d / "agentd.toml"
    # Root would truncate what the symlink names when it writes the audit head.
    (d / "audit.log.head.tmp").symlink_to(victim)
    return d / "audit.log.head.tmp"


@pytest.mark.parametrize("case", ["parent writable", "parent not root's", "dir writable",
                                  "trusted_keys writable", "agentd.toml not root's",
                                  "symlink planted"])
def test_a_dev_directory_others_can_change_is_refused(tmp_root: Path, case: str) -> None:
    """sshd's StrictModes: DIR, what is in it and every parent must be root's alone."""
    from tests.harness import REPO

    parent = tmp_root / "parent"
    parent.mkdir(mode=0o755)
    d = parent / "dev"
    d.mkdir(mode=0o750)
    (d / "trusted_keys").write_text("# none\n")
    (d / "trusted_keys").chmod(0o600)
    victim = tmp_root / "victim"
    victim.write_text("precious\n")
    named = _plant(case, d, victim)
    try:
        done = subprocess.run([sys.executable, "-m", "daemon.main", "--dev", str(d)],
                              cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    finally:
        parent.chmod(0o755)
        os.chown(parent, 0, 0)
    assert done.returncode == 1, done.stderr
    err = done.stderr
    fix = {"parent writable": f"chmod go-w {named}", "dir writable": f"chmod go-w {named}",
           "trusted_keys writable": f"chmod go-w {named}", "parent not root's":
           f"chown root {named}", "agentd.toml not root's": f"chown root {named}",
           "symlink planted": f"{named} is a symbolic link"}[case]
    assert fix in err, err
    assert victim.read_text() == "precious\n"
    assert not (d / "agentd.sock").exists() and not (d / "state").exists()


def test_a_dev_directory_under_sticky_tmp_is_accepted(fresh_daemon: Daemon) -> None:
    """/tmp is world-writable but sticky: a root 0750 DIR below a root 0700 one is safe."""
    tmp = os.stat("/tmp")
    assert tmp.st_mode & stat.S_ISVTX and tmp.st_mode & stat.S_IWOTH
    assert str(fresh_daemon.dir).startswith("/tmp/")
    assert fresh_daemon.stub.Info(agentd_pb2.InfoRequest(), timeout=30).host_id
