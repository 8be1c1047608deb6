"""cut: take an allowlist agent's hands without killing it.

Every flow it has open is closed and its allowlist emptied, so it can reach
nothing more; it keeps running (and its output, files and state stay there
to be inspected). Like freeze, a cut only takes away: it acts first and is
recorded after, whoever may freeze may cut, and it keeps working while the
replay cache is degraded.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.errors import FailedPrecondition
from daemon.supervisor.agent import Agent


@dataclass(frozen=True)
class Cut:
    vc: VerifiedCommand
    agent: Agent
    flows_open: int  # as the proxy last reported, before the cut


def admit(ctx: Ctx, envelope: agentd_pb2.Envelope) -> tuple[VerifiedCommand, Agent]:
    """Verify and reserve (on an admission lane). Raises AgentdError."""
    def precheck(vc: VerifiedCommand) -> Agent:
        action = vc.command.cut
        agent = ctx.sup.get(action.name, action.id)
        if agent.is_ended:
            raise FailedPrecondition(f"agent {agent.name!r} has ended; nothing to cut")
        if agent.egress is None:
            network = agent.sandbox.network if agent.sandbox else "?"
            raise FailedPrecondition(
                f"agent {agent.name!r} runs with network {network!r}, not \"allowlist\": "
                "agentd carries none of its flows, so there is nothing to cut; "
                "freeze or kill it instead")
        return agent

    return ctx.gate.admit(envelope, "cut", precheck)


def act(ctx: Ctx, admitted: tuple[VerifiedCommand, Agent]) -> Cut:
    """Close every flow and empty the allowlist. Never waits on the proxy."""
    vc, agent = admitted
    egress = agent.egress
    flows = egress.flows_open if egress is not None else 0
    ctx.sup.cut_agent(agent)
    return Cut(vc, agent, flows)


def record(ctx: Ctx, c: Cut) -> bool:
    """On the recorder thread: the records of a cut. True once durable."""
    return transaction.record_stop(ctx, c.vc, c.agent.name, {
        "action": "cut", "name": c.agent.name, "agent_id": c.agent.id, "ok": True,
        "flows_open": c.flows_open}, agent_id=c.agent.id)
