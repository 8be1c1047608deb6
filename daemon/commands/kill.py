"""kill: cgroup.kill at once, answer once the kernel says the cgroup is empty."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.supervisor import killer
from daemon.supervisor.agent import Agent


@dataclass(frozen=True)
class Killed:
    vc: VerifiedCommand
    agent: Agent
    outcome: killer.KillOutcome


def admit(ctx: Ctx, envelope: agentd_pb2.Envelope) -> tuple[VerifiedCommand, Agent]:
    """Verify and reserve (on an admission lane: unverified work never reaches the stop lane)."""
    def precheck(vc: VerifiedCommand) -> Agent:
        return ctx.sup.get(vc.command.kill.name, vc.command.kill.id)

    return ctx.gate.admit(envelope, "kill", precheck)


def act(ctx: Ctx, admitted: tuple[VerifiedCommand, Agent]) -> Killed:
    """Kill and verify. Nothing slow: no fsync, no log write. Raises AgentdError."""
    vc, agent = admitted
    accepted = time.monotonic()
    agent.request_end("killed")
    outcome = killer.kill(agent, accepted_at=accepted,
                          verify_timeout=ctx.cfg.kill_verify_timeout_s)
    ctx.sup.settle(agent, outcome)
    return Killed(vc, agent, outcome)


def record(ctx: Ctx, k: Killed) -> bool:
    """On the recorder thread: the records of a kill. True once durable."""
    return transaction.record_stop(ctx, k.vc, k.agent.name,
                                   {**killer.outcome_fields(k.agent, k.outcome),
                                    "action": k.vc.action}, agent_id=k.agent.id)
