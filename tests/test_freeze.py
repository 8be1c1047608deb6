"""Freeze, inspect, then kill or thaw: the normal path for a suspicious agent."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from tests.harness import AGENT_PYTHON, SANDBOX_PROCS, Daemon, alive, pids_in, wait_for

pytestmark = pytest.mark.root


def _freeze(d: Daemon, name: str, frozen: bool, key: object = None) -> agentd_pb2.Agent:
    def fill(c: agentd_pb2.Command) -> None:
        (c.freeze if frozen else c.thaw).name = name

    env = d.signed(fill, key or d.keys.operator)  # type: ignore[arg-type]
    result: agentd_pb2.Agent = (d.stub.Freeze if frozen else d.stub.Thaw)(env, timeout=30)
    return result


def _frozen_in_kernel(agent: agentd_pb2.Agent) -> bool:
    events = (Path(agent.cgroup_paths[0]) / "cgroup.events").read_text()
    return "frozen 1" in events


def test_a_frozen_forker_stops_forking_and_still_dies_at_once(daemon: Daemon,
                                                             hostile: Path) -> None:
    name = f"suspect-{daemon.mode}"
    agent = daemon.run(name, [AGENT_PYTHON, str(hostile / "fork_storm.py")],
                       pids=256 if daemon.mode == "hybrid" else 0)
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)
    frozen = _freeze(daemon, name, True, daemon.keys.oncall)
    assert frozen.state == agentd_pb2.AGENT_STATE_FROZEN
    assert _frozen_in_kernel(agent)
    members = pids_in(agent.cgroup_paths[0])
    time.sleep(0.3)
    assert pids_in(agent.cgroup_paths[0]) == members, "a frozen agent forked"
    result = daemon.kill(name)
    assert result.verified_empty and result.processes_killed == len(members)
    assert [p for p in members if alive(p)] == []
    assert daemon.get(name).state == agentd_pb2.AGENT_STATE_KILLED


def test_thaw_lets_it_run_again_and_needs_more_than_oncall(fresh_daemon: Daemon,
                                                          hostile: Path) -> None:
    d = fresh_daemon
    agent = d.run("paused", [AGENT_PYTHON, str(hostile / "fork_storm.py")], pids=256)
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)
    _freeze(d, "paused", True, d.keys.oncall)
    with pytest.raises(grpc.RpcError) as exc:
        _freeze(d, "paused", False, d.keys.oncall)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert d.get("paused").state == agentd_pb2.AGENT_STATE_FROZEN
    thawed = _freeze(d, "paused", False, d.keys.operator)
    assert thawed.state == agentd_pb2.AGENT_STATE_RUNNING
    assert not _frozen_in_kernel(agent)
    before = set(pids_in(agent.cgroup_paths[0]))
    assert wait_for(lambda: set(pids_in(agent.cgroup_paths[0])) != before, 5), (
        "the thawed agent did not run again")
    d.kill("paused")


def test_stop_of_a_frozen_agent_kills_without_thawing(fresh_daemon: Daemon,
                                                      hostile: Path) -> None:
    d = fresh_daemon
    agent = d.run("cold", [AGENT_PYTHON, str(hostile / "daemonize.py")])
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)
    _freeze(d, "cold", True)
    # The longest grace there is: a stop that waited it would outlast the
    # RPC's own deadline (60 s) and fail. None is waited: the agent is
    # frozen, and would never run again to see the SIGTERM.
    result = d.stop_agent("cold", grace_ms=300_000)
    assert result.verified_empty
    assert result.method in ("cgroup.kill", "freeze-and-kill")
    assert result.terminated_by_sigterm == 0 and result.processes_killed == 2 + SANDBOX_PROCS


def test_freeze_of_an_ended_agent_is_refused(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    d.run("gone", ["/bin/true"])
    assert wait_for(lambda: d.get("gone").state == agentd_pb2.AGENT_STATE_EXITED, 10)
    with pytest.raises(grpc.RpcError) as exc:
        _freeze(d, "gone", True)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
