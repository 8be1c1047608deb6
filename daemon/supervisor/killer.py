"""Stop and kill: the shortest path in the daemon.

Nothing slow stands before the kill: no fsync, no log write, no lock held by
other work. The caller audits after this returns.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from daemon.cgroups import fs
from daemon.cgroups.tree import AgentCgroup, Stuck
from daemon.errors import CgroupError
from daemon.supervisor.agent import Agent, State


@dataclass
class KillOutcome:
    processes_killed: int = 0
    duration_ms: float = 0.0
    verified_empty: bool = True
    stuck: list[Stuck] = field(default_factory=list)
    method: str = ""
    terminated_by_sigterm: int = 0
    already_ended: bool = False


def kill(agent: Agent, *, accepted_at: float, verify_timeout: float) -> KillOutcome:
    """cgroup.kill at once, then wait until the kernel says the cgroup is empty.

    accepted_at is the monotonic time the command was accepted; duration_ms
    runs from there to verified empty.
    """
    if agent.is_ended:
        return _already_ended(accepted_at)
    agent.kill_requested = True
    before, out = _kill_and_verify(agent.cgroup, accepted_at, verify_timeout)
    out.processes_killed = len(before)
    return out


@dataclass
class Termination:
    """A stop under way: SIGTERM sent, the grace period running (see begin_stop)."""

    accepted_at: float
    at_term: set[int]
    # Set when the stop needs no grace period: it is already over.
    outcome: KillOutcome | None = None


def begin_stop(agent: Agent, *, accepted_at: float, verify_timeout: float) -> Termination:
    """SIGTERM every member (the agent's own processes), or kill a frozen agent at once.

    Quick: one read of cgroup.procs and a signal per member. The caller waits
    up to its grace period for the cgroup to empty (without holding anything
    a kill needs), then calls finish_stop.
    """
    if agent.is_ended:
        return Termination(accepted_at, set(), _already_ended(accepted_at))
    agent.kill_requested = True
    if agent.state == State.FROZEN:
        # Thawing it so that it could act on SIGTERM would let a suspect agent
        # run again: a frozen agent is stopped by cgroup.kill alone.
        before, out = _kill_and_verify(agent.cgroup, accepted_at, verify_timeout)
        out.processes_killed = len(before)
        return Termination(accepted_at, before, out)
    agent.set_state(State.STOPPING)
    group = agent.cgroup
    at_term = set(pids_of(group))
    # Not to bwrap's outer process, the agent's main pid: it would die of
    # SIGTERM at once, and the daemon kills the rest of the cgroup when the
    # main process exits, cutting the agent's grace period short. bwrap's
    # init ignores SIGTERM anyway (pid_namespaces(7)).
    group.signal_all(signal.SIGTERM, exclude=agent.helper_pids)
    return Termination(accepted_at, at_term)


def finish_stop(agent: Agent, term: Termination, *, verify_timeout: float) -> KillOutcome:
    """After the grace period: the SIGTERM's outcome if the cgroup emptied, else kill it."""
    if term.outcome is not None:
        return term.outcome
    group = agent.cgroup
    if not group.populated():
        # Empty: by the SIGTERM, or by a kill that came meanwhile (a signed
        # kill, an estop, a lease, a tripwire), which the SIGTERM must not
        # be credited with.
        by_kill = bool(group.killed)
        return KillOutcome(
            processes_killed=len(term.at_term),
            terminated_by_sigterm=0 if by_kill else len(term.at_term),
            duration_ms=(time.monotonic() - term.accepted_at) * 1e3,
            method=group.killed or "SIGTERM",
        )
    at_kill, out = _kill_and_verify(group, term.accepted_at, verify_timeout)
    out.processes_killed = len(term.at_term | at_kill)
    out.terminated_by_sigterm = len(term.at_term - at_kill)
    return out


def stop(agent: Agent, *, accepted_at: float, grace: float, verify_timeout: float) -> KillOutcome:
    """SIGTERM every member, wait up to grace for the cgroup to empty, then kill.

    Blocks for the grace period: for the daemon's own stops (max_runtime),
    which run in its pool. Signed stops wait their grace without a thread
    (daemon.api), through begin_stop and finish_stop.
    """
    term = begin_stop(agent, accepted_at=accepted_at, verify_timeout=verify_timeout)
    if term.outcome is None:
        agent.cgroup.wait_empty(time.monotonic() + grace)
    return finish_stop(agent, term, verify_timeout=verify_timeout)


def _already_ended(accepted_at: float) -> KillOutcome:
    return KillOutcome(already_ended=True, method="none",
                       duration_ms=(time.monotonic() - accepted_at) * 1e3)


def _kill_and_verify(
    group: AgentCgroup, accepted_at: float, verify_timeout: float
) -> tuple[set[int], KillOutcome]:
    """Kill the cgroup and wait for empty. Returns (members just before the kill, outcome)."""
    # One read of cgroup.procs before the kill to count what is killed: a
    # read, not a write or an fsync. Forks racing the kill are caught by
    # cgroup.kill itself.
    before = set(pids_of(group))
    try:
        method = group.kill()
    except CgroupError:
        # The agent ended and its cgroup was removed between lookup and kill.
        if not fs.exists(group.v2):
            return before, _already_ended(accepted_at)
        raise
    empty = group.wait_empty(time.monotonic() + verify_timeout)
    out = KillOutcome(duration_ms=(time.monotonic() - accepted_at) * 1e3, method=method,
                      verified_empty=empty)
    if not empty:
        # A task in uninterruptible sleep dies only when it leaves it; like
        # systemd ("Processes still around after final SIGKILL") report it
        # and go on rather than hang.
        out.stuck = group.stuck()
    return before, out


def pids_of(group: AgentCgroup) -> list[int]:
    """Members of the cgroup, or none if it is gone or unreadable."""
    try:
        return group.pids()
    except CgroupError:
        return []


@dataclass(frozen=True)
class StopResult:
    agent: Agent
    outcome: KillOutcome


def outcome_fields(agent: Agent, out: KillOutcome) -> dict[str, object]:
    """The audit record's fields for a stop or kill of agent."""
    return {
        "ok": out.verified_empty, "name": agent.name, "agent_id": agent.id,
        "processes_killed": out.processes_killed, "duration_ms": round(out.duration_ms, 3),
        "verified_empty": out.verified_empty, "method": out.method,
        "already_ended": out.already_ended, "terminated_by_sigterm": out.terminated_by_sigterm,
        "stuck": [{"pid": s.pid, "state": s.state, "wchan": s.wchan} for s in out.stuck],
    }
