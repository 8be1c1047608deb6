"""Fail-closed controls: leases (the dead-man's switch), run-time limits, estop.

Composed into the Supervisor, whose registry they use through a Protocol
(Host), not the Supervisor class: the dependency points one way. Expired
deadlines arrive from the enforcement loop, which must keep ticking (it is
the watchdogs' heartbeat): the loop only writes cgroup.kill; verification,
audit and stops with a grace period run elsewhere.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from daemon.audit import AuditLog
from daemon.cgroups.tree import AgentTree, first, wait_all_empty
from daemon.config import Config
from daemon.errors import CgroupError, FailedPrecondition
from daemon.supervisor import killer
from daemon.supervisor.agent import Agent, State
from daemon.supervisor.enforcer import Enforcer, Expired
from daemon.supervisor.killer import KillOutcome, StopResult, outcome_fields, pids_of
from daemon.supervisor.latch import Latch
from daemon.supervisor.reactor import Reactor


class Host(Protocol):
    """What the fail-safe controls need of the supervisor."""

    cfg: Config
    audit: AuditLog
    tree: AgentTree
    reactor: Reactor
    enforcer: Enforcer
    latch: Latch

    def running(self) -> list[Agent]: ...

    def settle(self, agent: Agent, outcome: KillOutcome) -> None: ...


@dataclass(frozen=True)
class RenewResult:
    agent: Agent
    ttl_ms: int
    remaining_s: float


@dataclass
class EstopResult:
    results: list[StopResult] = field(default_factory=list)
    duration_ms: float = 0.0
    # From acceptance to the first and the last cgroup.kill written.
    first_kill_ms: float = 0.0
    last_kill_ms: float = 0.0


class Failsafe:
    def __init__(self, sup: Host) -> None:
        self.sup = sup
        self.cfg = sup.cfg
        # Verifies lease kills and nothing else: sharing the finalisers' pool
        # would stamp a cgroup empty only when a busy worker got round to it.
        self._verifier = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agentd-verify")

    def close(self) -> None:
        self._verifier.shutdown(wait=True)

    # --------------------------------------------------------------- leases
    def renew(self, agent: Agent, ttl_ms: int) -> float | None:
        """Extend agent's lease to ttl from now; the seconds left, or None if it ran out."""
        if not self.sup.enforcer.renew(agent, time.monotonic() + ttl_ms / 1000):
            return None
        agent.lease_ttl_ms = ttl_ms
        return self.sup.enforcer.remaining(agent, "lease") or 0.0

    def on_expired(self, expired: Expired) -> None:
        """Called from the enforcement loop: hard-kill expired leases, stop overrun agents.

        The loop must keep ticking (it is the watchdogs' heartbeat), so it
        only writes cgroup.kill for every expired lease, which is fast; the
        verification, audit and any stop with a grace period run in the pool.
        """
        leases = [(a, at) for a, kind, at in expired if kind == "lease" and not a.is_ended]
        killed_at: list[float] = []
        if leases:
            # Every kill first, in one loop: each agent's end reason, its
            # write, the time it was written. Nothing else until all are out.
            with self.sup.reactor.kill_gate, first(enabled=self.sup.tree.has_cgroup_kill):
                for a, _ in leases:
                    a.request_end("lease_expired")
                    _kill(a)
                    killed_at.append(time.monotonic())
            self._verifier.submit(self._verify_expiries, leases, killed_at)
        for a, kind, _ in expired:
            if kind == "max_runtime" and not a.is_ended:
                a.request_end("max_runtime")
                self.sup.reactor.pool.submit(self._stop_overrun, a)

    def _verify_expiries(self, leases: list[tuple[Agent, float]], killed_at: list[float]) -> None:
        """Wait for every expired agent's cgroup to empty, then audit each.

        One task for the whole batch: polling them together stamps each one
        as it empties, where a task per agent would queue later agents behind
        earlier agents' audit fsyncs and report that queueing as kill time.
        """
        by_group = {a.cgroup: a for a, _ in leases}
        seen = wait_all_empty(by_group, time.monotonic() + self.cfg.kill_verify_timeout_s)
        emptied = {by_group[g]: t for g, t in seen.items()}
        for a, _ in leases:
            if a in emptied:
                a.set_state(State.KILLED)
        # fsync'd audit records go to the general pool, not this verifier.
        self.sup.reactor.pool.submit(self._audit_expiries, leases, killed_at, emptied)

    def _audit_expiries(self, leases: list[tuple[Agent, float]], killed_at: list[float],
                        emptied: dict[Agent, float]) -> None:
        for (a, deadline), written in zip(leases, killed_at, strict=True):
            done = emptied.get(a)
            self.sup.audit.append(
                "lease_expired", name=a.name, agent_id=a.id, ttl_ms=a.lease_ttl_ms,
                verified_empty=done is not None,
                # How late the kill was written, and how long from the deadline
                # until the kernel reported the cgroup empty.
                deadline_to_kill_ms=round((written - deadline) * 1e3, 3),
                deadline_to_empty_ms=None if done is None else round((done - deadline) * 1e3, 3),
                stuck=[s.pid for s in a.cgroup.stuck()] if done is None else [],
            )

    def _stop_overrun(self, agent: Agent) -> None:
        out = killer.stop(agent, accepted_at=time.monotonic(), grace=self.cfg.default_grace_s,
                          verify_timeout=self.cfg.kill_verify_timeout_s)
        self.sup.settle(agent, out)
        self.sup.audit.append("max_runtime_reached", max_runtime_ms=agent.max_runtime_ms,
                          **outcome_fields(agent, out))

    # --------------------------------------------------------------- estop
    def estop_all(self, accepted: float, *, reason: str, by: str) -> EstopResult:
        """Latch in memory, kill every agent at once, wait for every cgroup to empty.

        Nothing slow: the latch is persisted and the command recorded after,
        by the caller (daemon.commands.estop).
        """
        # The latch first, in memory: from here no run can start, and a run
        # already starting kills its own agent when it sees the latch.
        self.sup.latch.engage(reason, by)
        running = self.sup.running()
        before: dict[str, list[int]] = {}
        written: list[float] = []
        with self.sup.reactor.kill_gate, first(enabled=self.sup.tree.has_cgroup_kill):
            # One loop, each agent in turn: its end reason, its count read
            # just before its own kill (not all counts before the first
            # kill: a thousand reads would stand in front of every kill),
            # the write, when it was written.
            for a in running:
                a.request_end("estop")
                before[a.id] = pids_of(a.cgroup)
                _kill(a)
                written.append(time.monotonic())
        emptied = wait_all_empty([a.cgroup for a in running],
                                 time.monotonic() + self.cfg.kill_verify_timeout_s)
        result = EstopResult()
        for a in running:
            empty = a.cgroup in emptied
            out = killer.KillOutcome(
                processes_killed=len(before[a.id]), verified_empty=empty,
                duration_ms=((emptied[a.cgroup] if empty else time.monotonic()) - accepted) * 1e3,
                method="cgroup.kill" if self.sup.tree.has_cgroup_kill else "freeze-and-kill",
                stuck=[] if empty else a.cgroup.stuck())
            self.sup.settle(a, out)
            result.results.append(StopResult(a, out))
        result.duration_ms = (time.monotonic() - accepted) * 1e3
        if written:
            result.first_kill_ms = (written[0] - accepted) * 1e3
            result.last_kill_ms = (written[-1] - accepted) * 1e3
        return result


def _kill(agent: Agent) -> bool:
    """Write the agent's cgroup.kill. False if its cgroup was already removed: it had ended.

    A try, not contextlib.suppress: this runs once per agent inside a burst.
    """
    try:
        agent.cgroup.kill()
    except CgroupError:
        return False
    return True


def ended_error(agent: Agent) -> FailedPrecondition:
    """A renew of an agent that has ended or is being ended: nothing to bring back."""
    return FailedPrecondition(
        f"agent {agent.name!r} has ended or is being ended "
        f"({agent.end_reason or agent.state.value}); a renew cannot bring it back")
