"""renew: extend an agent's lease (the dead-man's switch) to ttl from now."""

from __future__ import annotations

from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.supervisor import runspec
from daemon.supervisor.agent import Agent
from daemon.supervisor.failsafe import ended_error


@dataclass(frozen=True)
class Renewed:
    agent: Agent
    ttl_ms: int
    remaining_s: float


def run(ctx: Ctx, envelope: agentd_pb2.Envelope) -> Renewed:
    """Admit, commit, renew. Raises AgentdError (audited)."""
    def precheck(vc: VerifiedCommand) -> Agent:
        runspec.check_ttl(vc.command.renew.ttl_ms, ctx.cfg)
        agent = ctx.sup.get(vc.command.renew.name, vc.command.renew.id)
        if agent.kill_requested or agent.is_ended:
            raise ended_error(agent)
        return agent

    vc, agent = ctx.gate.admit(envelope, "renew", precheck)
    ttl_ms = vc.command.renew.ttl_ms
    transaction.commit(ctx, vc, agent.name, agent_id=agent.id, ttl_ms=ttl_ms)
    remaining = ctx.sup.failsafe.renew(agent, ttl_ms)
    if remaining is None:
        # The lease ran out between the check and now.
        err = ended_error(agent)
        transaction.result(ctx, vc, ok=False, error=err.message, agent_id=agent.id)
        raise err
    return Renewed(agent, ttl_ms, remaining)
