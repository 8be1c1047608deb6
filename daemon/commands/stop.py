"""stop: SIGTERM, a grace period, then cgroup.kill if anything is left.

The grace period is waited by the API without a thread (daemon.api): a
stop in its grace period holds nothing that a kill needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.errors import InvalidArgument
from daemon.supervisor import killer
from daemon.supervisor.agent import Agent


@dataclass(frozen=True)
class Stopping:
    vc: VerifiedCommand
    agent: Agent
    grace_s: float
    term: killer.Termination


def admit(ctx: Ctx, envelope: agentd_pb2.Envelope
          ) -> tuple[VerifiedCommand, tuple[Agent, float]]:
    """Verify and reserve (on an admission lane). Raises AgentdError."""
    def precheck(vc: VerifiedCommand) -> tuple[Agent, float]:
        action = vc.command.stop
        grace = ctx.cfg.default_grace_s if not action.HasField("grace_ms") else (
            action.grace_ms / 1000.0)
        if grace > ctx.cfg.max_grace_s:
            raise InvalidArgument(
                f"grace period {grace:g}s exceeds the daemon's maximum of "
                f"{ctx.cfg.max_grace_s:g}s")
        return ctx.sup.get(action.name, action.id), grace

    return ctx.gate.admit(envelope, "stop", precheck)


def begin(ctx: Ctx, admitted: tuple[VerifiedCommand, tuple[Agent, float]]) -> Stopping:
    """SIGTERM (or kill a frozen agent at once). Quick. Raises AgentdError."""
    vc, (agent, grace) = admitted
    accepted = time.monotonic()
    agent.request_end("stopped")
    term = killer.begin_stop(agent, accepted_at=accepted,
                             verify_timeout=ctx.cfg.kill_verify_timeout_s)
    return Stopping(vc, agent, grace, term)


def finish(ctx: Ctx, s: Stopping) -> killer.KillOutcome:
    """After the grace period (or once the cgroup emptied): kill what is left, verify."""
    outcome = killer.finish_stop(s.agent, s.term, verify_timeout=ctx.cfg.kill_verify_timeout_s)
    ctx.sup.settle(s.agent, outcome)
    return outcome


def record(ctx: Ctx, s: Stopping, outcome: killer.KillOutcome) -> bool:
    """On the recorder thread: the records of a stop. True once durable."""
    return transaction.record_stop(ctx, s.vc, s.agent.name,
                                   {**killer.outcome_fields(s.agent, outcome),
                                    "action": s.vc.action}, agent_id=s.agent.id)
