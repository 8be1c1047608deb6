"""Freeze and thaw: stop an agent where it stands, for inspection, through the cgroup freezer.

Composed into the Supervisor. A frozen agent stays killable at once: frozen
tasks take cgroup.kill (cgroup-v2.rst), and a stop of a frozen agent kills it
without thawing it (killer.stop).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.errors import CgroupError, FailedPrecondition
from daemon.supervisor.agent import Agent, State

if TYPE_CHECKING:
    from daemon.supervisor.core import Supervisor

FREEZE_TIMEOUT_S = 5.0


class Freezer:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def freeze(self, envelope: agentd_pb2.Envelope, frozen: bool) -> Agent:
        """Signed freeze or thaw. Raises AgentdError (audited)."""
        rpc = "freeze" if frozen else "thaw"

        def precheck(vc: VerifiedCommand) -> Agent:
            action = vc.command.freeze if frozen else vc.command.thaw
            agent = self.sup.get(action.name)
            if agent.is_ended or agent.kill_requested:
                raise FailedPrecondition(
                    f"agent {agent.name!r} has ended or is being ended; nothing to {rpc}")
            return agent

        vc, agent = self.sup.gate.admit(envelope, rpc, precheck)
        done, ms = self.freeze_agent(agent, frozen)
        self.sup.gate.audit_accepted(vc, agent.name, agent_id=agent.id)
        self.sup.audit_result(vc, action=rpc, name=agent.name, agent_id=agent.id, ok=done,
                          verified=done, duration_ms=round(ms, 3))
        self.sup.gate.replay.persist()
        if not done:
            raise FailedPrecondition(
                f"the kernel did not report {agent.name!r} {'frozen' if frozen else 'thawed'} "
                f"within {FREEZE_TIMEOUT_S:g}s (a task in uninterruptible sleep delays "
                "freezing); it can still be killed at once")
        return agent

    def freeze_agent(self, agent: Agent, frozen: bool) -> tuple[bool, float]:
        """Freeze or thaw agent through its cgroup; (verified by the kernel, ms taken).

        Also the tripwires' "freeze" action. Nothing here stands in the way of
        a kill: frozen tasks take cgroup.kill.
        """
        t0 = time.monotonic()
        try:
            done = agent.cgroup.freeze(frozen, FREEZE_TIMEOUT_S)
        except CgroupError:
            if agent.is_ended:
                return False, (time.monotonic() - t0) * 1e3
            raise
        if done:
            with agent.lock:
                if not agent.is_ended and not agent.kill_requested:
                    agent.state = State.FROZEN if frozen else State.RUNNING
        return done, (time.monotonic() - t0) * 1e3
