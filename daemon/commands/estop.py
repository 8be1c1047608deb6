"""estop: kill every agent at once, then latch until a quorum reset."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.supervisor.failsafe import EstopResult


@dataclass(frozen=True)
class Estopped:
    vc: VerifiedCommand
    result: EstopResult


def admit(ctx: Ctx, envelope: agentd_pb2.Envelope) -> VerifiedCommand:
    """Verify and reserve (on an admission lane). Raises AgentdError."""
    vc, _ = ctx.gate.admit(envelope, "estop")
    return vc


def act(ctx: Ctx, vc: VerifiedCommand) -> Estopped:
    """Latch in memory, kill every agent and verify."""
    accepted = time.monotonic()
    result = ctx.sup.failsafe.estop_all(
        accepted, reason=vc.command.reason or "emergency stop", by=",".join(vc.principals))
    return Estopped(vc, result)


def record(ctx: Ctx, e: Estopped) -> bool:
    """On the recorder thread: persist the latch, then the records. True once durable."""
    latched = ctx.sup.latch.persist_or_retry()
    r = e.result
    durable = transaction.record_stop(ctx, e.vc, "*", {
        "action": "estop", "agents_killed": len(r.results),
        "processes_killed": sum(x.outcome.processes_killed for x in r.results),
        "all_verified_empty": all(x.outcome.verified_empty for x in r.results),
        "duration_ms": round(r.duration_ms, 3), "latched": True,
        "first_kill_ms": round(r.first_kill_ms, 3), "last_kill_ms": round(r.last_kill_ms, 3),
        "latch_persisted": latched, "agents": [x.agent.id for x in r.results]})
    return durable and latched
