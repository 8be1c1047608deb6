"""Nothing a client can hold delays a kill (issue 10), against a real daemon.

Each test loads the daemon the way a hostile or careless client can (calls
whose request never arrives, stops in their grace period, a keyless flood,
a full disk) and then checks that a signed kill of a real agent is served
and verified empty. No test asserts a duration: each waits for an event,
with bounds generous enough for a busy 2-core machine.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from daemon.api.server import RECEIVE_DEADLINE_S
from tests.harness import AGENT_PYTHON, Daemon, pids_in, wait_for
from tests.load import StalledCalls

pytestmark = pytest.mark.root
_names = itertools.count()
SLEEPER = ["/bin/sleep", "600"]


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def _kill_served(d: Daemon, name: str) -> agentd_pb2.KillResult:
    """Kill agent name (running); fail unless the kill is served and the cgroup is empty."""
    agent = d.get(name)
    result = d.kill(name)
    assert result.verified_empty, f"stuck: {result.stuck}"
    assert result.processes_killed >= 1
    for path in agent.cgroup_paths:
        assert pids_in(path) == [], f"{path} still has processes"
    assert d.get(name).state == agentd_pb2.AGENT_STATE_KILLED
    return result


def _ready(agent: agentd_pb2.Agent) -> None:
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 30), (
        Path(agent.stderr_log).read_text()[-500:])


# ------------------------------------------------------------ stalled calls
def test_kill_served_beside_1000_stalled_calls(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    name = _name("victim")
    d.run(name, SLEEPER)
    stalled = StalledCalls(d.socket, 1000)
    try:
        assert len(stalled.channels) >= 12  # 1000 calls need 10 connections at 100 each
        # Every call has sent its headers and holds its stream; none is over.
        assert stalled.pending() == 1000, stalled.codes()
        _kill_served(d, name)
        assert stalled.pending() == 1000, (
            "stalled calls ended before the kill was sent; the test proved nothing "
            f"(the machine is too slow for {RECEIVE_DEADLINE_S:g} s): {stalled.codes()}")
        # The server ends each of them once the receive deadline has passed.
        assert wait_for(lambda: stalled.pending() == 0, RECEIVE_DEADLINE_S * 12, 0.2), (
            f"{stalled.pending()} stalled calls still open long after the receive deadline")
        assert stalled.codes() == {grpc.StatusCode.DEADLINE_EXCEEDED: 1000}, stalled.codes()
        assert all("did not arrive" in (f.details() or "") for f in stalled.futures)
    finally:
        stalled.close()
    # The daemon still serves after them.
    again = _name("victim")
    d.run(again, SLEEPER)
    _kill_served(d, again)


# ------------------------------------------------------- stops in their grace
def test_kill_served_beside_70_stops_in_their_grace_period(fresh_daemon: Daemon,
                                                           hostile: Path) -> None:
    """70 stops wait out 300 s grace periods; a kill of another agent is served, then of them."""
    d = fresh_daemon
    stubborn = [_name("stubborn") for _ in range(70)]
    for n in stubborn:
        _ready(d.run(n, [AGENT_PYTHON, str(hostile / "ignore_term.py")]))
    victim = _name("victim")
    d.run(victim, SLEEPER)

    stops = []
    for n in stubborn:
        cmd = d.command()
        cmd.stop.name = n
        cmd.stop.grace_ms = 300_000  # the daemon's maximum
        stops.append(d.stub.Stop.future(d.sign(cmd, d.keys.oncall), timeout=600))
    assert wait_for(lambda: all(d.get(n).state == agentd_pb2.AGENT_STATE_STOPPING
                                for n in stubborn), 60, 0.2), "the stops did not all begin"
    assert not any(f.done() for f in stops), [f.exception() for f in stops if f.done()]

    _kill_served(d, victim)
    # A kill during a pending stop works too, and ends that stop.
    for n in stubborn:
        _kill_served(d, n)
    for n, f in zip(stubborn, stops, strict=True):
        result = f.result(timeout=60)
        assert result.name == n
        assert result.verified_empty, f"{n}: stuck {result.stuck}"
        assert result.state == agentd_pb2.AGENT_STATE_KILLED
