"""freeze and thaw: stop an agent where it stands (cgroup.freeze), and let it run again.

Freeze is a stop: it acts first and is recorded after. Thaw lets a suspect
agent run again, so it is committed (durably recorded) before it acts.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.errors import FailedPrecondition
from daemon.supervisor.agent import Agent
from daemon.supervisor.freezing import FREEZE_TIMEOUT_S


@dataclass(frozen=True)
class Frozen:
    vc: VerifiedCommand
    agent: Agent
    done: bool
    ms: float


def _admit(ctx: Ctx, envelope: agentd_pb2.Envelope, rpc: str) -> tuple[VerifiedCommand, Agent]:
    def precheck(vc: VerifiedCommand) -> Agent:
        action = vc.command.freeze if rpc == "freeze" else vc.command.thaw
        agent = ctx.sup.get(action.name, action.id)
        if agent.is_ended or agent.kill_requested:
            raise FailedPrecondition(
                f"agent {agent.name!r} has ended or is being ended; nothing to {rpc}")
        return agent

    return ctx.gate.admit(envelope, rpc, precheck)


def admit(ctx: Ctx, envelope: agentd_pb2.Envelope) -> tuple[VerifiedCommand, Agent]:
    """Verify and reserve (on an admission lane). Raises AgentdError."""
    return _admit(ctx, envelope, "freeze")


def act(ctx: Ctx, admitted: tuple[VerifiedCommand, Agent]) -> Frozen:
    """Freeze and wait for the kernel to report it frozen. Raises AgentdError."""
    vc, agent = admitted
    done, ms = ctx.sup.freeze_agent(agent, True)
    return Frozen(vc, agent, done, ms)


def record(ctx: Ctx, f: Frozen) -> bool:
    """On the recorder thread: the records of a freeze. True once durable."""
    return transaction.record_stop(ctx, f.vc, f.agent.name, {
        "action": "freeze", "name": f.agent.name, "agent_id": f.agent.id, "ok": f.done,
        "verified": f.done, "duration_ms": round(f.ms, 3)}, agent_id=f.agent.id)


def check_done(f: Frozen) -> Agent:
    """The agent, or FailedPrecondition if the kernel did not report it frozen in time."""
    if not f.done:
        raise _not_done(f.agent, "frozen")
    return f.agent


def thaw(ctx: Ctx, envelope: agentd_pb2.Envelope) -> Agent:
    """Admit, commit, thaw. Raises AgentdError."""
    vc, agent = _admit(ctx, envelope, "thaw")
    transaction.commit(ctx, vc, agent.name, agent_id=agent.id)
    done, ms = ctx.sup.freeze_agent(agent, False)
    transaction.result(ctx, vc, action="thaw", name=agent.name, agent_id=agent.id, ok=done,
                       verified=done, duration_ms=round(ms, 3))
    if not done:
        raise _not_done(agent, "thawed")
    return agent


def _not_done(agent: Agent, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the kernel did not report {agent.name!r} {what} within {FREEZE_TIMEOUT_S:g}s "
        "(a task in uninterruptible sleep delays freezing); it can still be killed at once")
