"""Hostile agents: each does its worst; after kill and after stop, nothing of it survives.

Runs against a real daemon on the real kernel, once per cgroup code path
(hybrid and pure v2), through the `daemon` fixture.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from tests.harness import (
    AGENT_PYTHON,
    SANDBOX_PROCS,
    Daemon,
    alive,
    host_pid,
    pids_in,
    v2_cgroup_of,
    wait_for,
)

pytestmark = pytest.mark.root
_names = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def _launch(daemon: Daemon, hostile: Path, program: str, *args: str, pids: int = 0,
            min_procs: int = 1) -> tuple[agentd_pb2.Agent, list[int]]:
    """Run a hostile program; wait until it says ready and has min_procs processes of its own."""
    agent = _start(daemon, hostile, program, *args, pids=pids)
    return agent, _ready(agent, program, min_procs)


def _start(daemon: Daemon, hostile: Path, program: str, *args: str,
           pids: int = 0) -> agentd_pb2.Agent:
    return daemon.run(_name(program.removesuffix(".py").replace("_", "-")),
                      [AGENT_PYTHON, str(hostile / program), *args], pids=pids)


def _ready(agent: agentd_pb2.Agent, program: str, min_procs: int) -> list[int]:
    cg = agent.cgroup_paths[0]
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15), (
        f"{program} never became ready: {Path(agent.stderr_log).read_text()[-500:]}")
    assert not min_procs or wait_for(lambda: len(pids_in(cg)) >= min_procs + SANDBOX_PROCS, 15), (
        f"{program} has {len(pids_in(cg))} processes, expected {min_procs} + the sandbox's")
    return pids_in(cg)


def _escaped(agent: agentd_pb2.Agent) -> int:
    """The host pid of the daemoniser's escaped grandchild (it prints its sandbox pid)."""
    ns_pid = int(Path(agent.stdout_log).read_text().split("escaped ")[1].split()[0])
    pid = host_pid(agent.cgroup_paths[0], ns_pid)
    assert pid is not None, f"no process with pid {ns_pid} in the agent's PID namespace"
    return pid


def _end(daemon: Daemon, name: str, action: str) -> agentd_pb2.KillResult:
    if action == "kill":
        return daemon.kill(name)
    return daemon.stop_agent(name, grace_ms=300)


def _assert_gone(daemon: Daemon, agent: agentd_pb2.Agent, members: list[int],
                 result: agentd_pb2.KillResult) -> None:
    assert result.verified_empty, f"stuck: {result.stuck}"
    for path in agent.cgroup_paths:
        assert pids_in(path) == [], f"{path} still has processes"
    survivors = [p for p in members if alive(p)]
    assert survivors == [], f"survivors: {survivors}"
    assert daemon.get(agent.name).state == agentd_pb2.AGENT_STATE_KILLED


def _pids_limit_or_skip(daemon: Daemon) -> None:
    from daemon.cgroups.layout import discover

    layout = discover(daemon.mode)
    if layout.holder("pids") is None:
        pytest.skip(f"no pids controller reaches the {daemon.mode} hierarchy on this host; "
                    "a fork bomb without a pids limit would take the machine down")


ACTIONS = ["kill", "stop"]


@pytest.mark.parametrize("action", ACTIONS)
def test_ignores_sigterm(daemon: Daemon, hostile: Path, action: str) -> None:
    agent, members = _launch(daemon, hostile, "ignore_term.py")
    result = _end(daemon, agent.name, action)
    _assert_gone(daemon, agent, members, result)
    assert result.processes_killed == 1 + SANDBOX_PROCS
    if action == "stop":
        # It ignored SIGTERM, so the grace period ran out and cgroup.kill did the work.
        assert result.terminated_by_sigterm == 0
        assert result.method in ("cgroup.kill", "freeze-and-kill")


@pytest.mark.parametrize("action", ACTIONS)
def test_double_fork_setsid_daemoniser(daemon: Daemon, hostile: Path, action: str) -> None:
    agent, members = _launch(daemon, hostile, "daemonize.py", min_procs=2)
    escaped = _escaped(agent)
    assert escaped in members, "the escaped daemon is still in the agent's cgroup"
    result = _end(daemon, agent.name, action)
    _assert_gone(daemon, agent, members, result)
    assert not alive(escaped)
    assert result.processes_killed == 2 + SANDBOX_PROCS


@pytest.mark.parametrize("action", ACTIONS)
def test_fork_bomb_bounded_by_pids_limit(daemon: Daemon, hostile: Path, action: str) -> None:
    _pids_limit_or_skip(daemon)
    agent, members = _launch(daemon, hostile, "fork_bomb.py", pids=64, min_procs=60)
    assert len(members) <= 64, "the pids limit did not hold"
    result = _end(daemon, agent.name, action)
    _assert_gone(daemon, agent, members, result)
    assert result.processes_killed >= 60


@pytest.mark.parametrize("action", ACTIONS)
def test_forks_while_the_kill_is_in_flight(daemon: Daemon, hostile: Path, action: str) -> None:
    agent, members = _launch(daemon, hostile, "fork_storm.py", pids=256 if daemon.mode ==
                             "hybrid" else 0, min_procs=2)
    result = _end(daemon, agent.name, action)
    _assert_gone(daemon, agent, members, result)


@pytest.mark.parametrize("action", ACTIONS)
def test_child_changes_process_group_and_session(daemon: Daemon, hostile: Path,
                                                  action: str) -> None:
    agent, members = _launch(daemon, hostile, "new_session.py", min_procs=3)
    sessions = {Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[3]
                for p in members}
    assert len(sessions) >= 2, "the hostile program did not change session"
    result = _end(daemon, agent.name, action)
    _assert_gone(daemon, agent, members, result)
    assert result.processes_killed == 3 + SANDBOX_PROCS


def test_main_exits_leaving_an_escaped_daemon(daemon: Daemon, hostile: Path) -> None:
    """The main process exits after daemonising: the daemon kills what it left behind."""
    agent, _ = _launch(daemon, hostile, "daemonize.py", "exit", min_procs=0)
    ns_pid = int(Path(agent.stdout_log).read_text().split("escaped ")[1].split()[0])
    # None: the daemon had already killed it by the time the test looked.
    escaped = host_pid(agent.cgroup_paths[0], ns_pid)
    assert wait_for(lambda: daemon.get(agent.name).state == agentd_pb2.AGENT_STATE_EXITED, 10)
    assert escaped is None or wait_for(lambda: not alive(escaped), 5), (
        "escaped grandchild outlived its agent")
    status = daemon.get(agent.name)
    assert status.exit_code == 0
    assert pids_in(agent.cgroup_paths[0]) == []
    ended = [r for r in daemon.audit_records()
             if r["event"] == "agent_ended" and r.get("agent_id") == agent.id]
    # The escaped daemon, and bwrap's init, which was still reaping for it.
    assert ended and ended[0]["leftover_processes_killed"] == 2


def test_unprivileged_agent_cannot_escape_or_reach_the_daemon(daemon: Daemon,
                                                             hostile: Path) -> None:
    from tests.escape.host import Launched
    from tests.harness import cgroup_v2_root

    agent = _start(daemon, hostile, "escape_attempts.py", str(daemon.pid), str(daemon.socket),
                   str(cgroup_v2_root()))
    launched = Launched.capture(agent)  # before any attempt can have moved a process
    members = _ready(agent, "escape_attempts.py", 1)
    out = Path(agent.stdout_log).read_text()
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    for attempt in ("move-to-root-cgroup", "move-to-parent-cgroup", "create-sub-cgroup",
                    "signal-daemon-kill", "signal-daemon-stop", "connect-control-socket",
                    "read-audit-log", "read-trust-store"):
        assert lines.get(attempt, "").startswith("BLOCKED"), f"{attempt}: {lines.get(attempt)}"
    own = "/" + str(Path(agent.cgroup_paths[0]).relative_to(cgroup_v2_root()))
    # Inside its cgroup namespace the agent's own cgroup reads as "/"; from
    # outside, every one of its processes is still in it.
    assert lines["cgroup-after"].strip() == "/"
    # A process that moved out is no longer listed in the cgroup it left: the
    # host finds every process of the agent (the pids at launch, its PID
    # namespace's, the pid it reports, mapped through NSpid) and reads
    # /proc/PID/cgroup of each.
    assert launched.sandbox_ns, f"no sandbox init among {sorted(launched.pids)}"
    reported = launched.host_pid(int(lines["pid"]))
    assert reported is not None, f"no process {lines['pid']} in the agent's PID namespace"
    assert launched.cgroup_escapes((reported,)) == []
    assert {v2_cgroup_of(p) for p in launched.processes()} == {own}
    assert alive(daemon.pid)
    info = daemon.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
    assert info.host_id == daemon.host_id
    result = daemon.kill(agent.name)
    _assert_gone(daemon, agent, members, result)


def _zombies_left(daemon: Daemon, members: list[int], timeout: float = 10.0) -> list[str]:
    """Wait for every member to be reaped; report any that a process other than ours reaps.

    While a member lingers as a zombie its parent must be the daemon (a child
    subreaper) or another member: one re-parented to the host's init is left
    to whatever that init does about zombies.
    """
    wrong: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lingering = []
        for pid in members:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # reaped
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if not fields.get("State", "").startswith("Z"):
                continue  # gone, and the pid reused by a live process
            ppid = int(fields["PPid"])
            if ppid != daemon.pid and ppid not in members:
                wrong.append(f"pid {pid} is a zombie of pid {ppid}, not of the daemon")
            lingering.append(pid)
        if wrong or not lingering:
            return wrong
        time.sleep(0.005)
    return [f"pid {pid} still a zombie after {timeout:g} s" for pid in lingering] + wrong


@pytest.mark.parametrize("action", [*ACTIONS, "exit"])
def test_no_zombie_is_left_of_an_agent(daemon: Daemon, hostile: Path, action: str) -> None:
    """After kill, stop and a normal exit, every process of the agent is reaped by the daemon."""
    go = hostile / f"exit-now-{next(_names)}"
    agent, members = _launch(daemon, hostile, "ignore_term.py", str(go))
    assert len(members) == 1 + SANDBOX_PROCS
    if action == "exit":
        go.touch()
        assert wait_for(lambda: daemon.get(agent.name).state == agentd_pb2.AGENT_STATE_EXITED,
                        15)
        assert daemon.get(agent.name).exit_code == 0
    else:
        _end(daemon, agent.name, action)
    assert _zombies_left(daemon, members) == []


def _stop_future(daemon: Daemon, name: str, *, grace_ms: int,
                 timeout: float) -> tuple[agentd_pb2.Command, grpc.Future]:
    """A signed stop of name with grace_ms, sent without waiting: (command, its call)."""
    cmd = daemon.command()
    cmd.stop.name = name
    cmd.stop.grace_ms = grace_ms
    return cmd, daemon.stub.Stop.future(daemon.sign(cmd, daemon.keys.oncall), timeout=timeout)


def test_a_stop_whose_client_goes_away_still_ends_the_agent(daemon: Daemon,
                                                           hostile: Path) -> None:
    """The client gives up during the grace period: the daemon kills at its end all the same."""
    agent, members = _launch(daemon, hostile, "ignore_term.py")
    cmd, call = _stop_future(daemon, agent.name, grace_ms=3000, timeout=0.5)
    with pytest.raises(grpc.RpcError) as err:
        call.result()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: daemon.get(agent.name).state == agentd_pb2.AGENT_STATE_KILLED, 60)
    assert wait_for(lambda: not [p for p in members if alive(p)], 30)
    command_id = cmd.command_id.hex()
    assert wait_for(lambda: [r for r in daemon.audit_records() if r["event"] == "result"
                             and r.get("command_id") == command_id], 30), "stop not recorded"


def test_a_stop_cut_short_by_a_kill_does_not_credit_its_sigterm(daemon: Daemon,
                                                                hostile: Path) -> None:
    """A SIGTERM-ignoring agent in its grace period, then killed: the stop reports the kill."""
    agent, _ = _launch(daemon, hostile, "ignore_term.py")
    _, stopping = _stop_future(daemon, agent.name, grace_ms=120_000, timeout=120)
    assert wait_for(lambda: daemon.get(agent.name).state == agentd_pb2.AGENT_STATE_STOPPING, 30)
    killed = daemon.kill(agent.name)
    assert killed.verified_empty
    stopped = stopping.result()
    assert stopped.verified_empty
    assert stopped.terminated_by_sigterm == 0, stopped
    assert stopped.method in ("cgroup.kill", "freeze-and-kill"), stopped
