"""The two ways a signed command is recorded, and the records themselves.

A command that starts or loosens (run, thaw, renew, reset) is committed
before it acts: its replay entry and its "accepted" record are durable, or
it is refused (and a crash right after cannot let it be replayed). A
command that stops (stop, kill, estop, freeze) acts first and is recorded
after, on the recorder thread; a disk that refuses the record leaves it
waiting in memory, and the reply says so.
"""

from __future__ import annotations

from typing import Any

from daemon.auth import VerifiedCommand
from daemon.commands.context import Ctx
from daemon.errors import AgentdError


def accepted_fields(vc: VerifiedCommand, target: str, **extra: Any) -> dict[str, Any]:
    """The "command accepted" record: hash, signers, action, target and reason."""
    return {
        "decision": "accepted", "rpc": vc.action, "action": vc.action, "target": target,
        "command_id": vc.command_id.hex(), "payload_sha256": vc.payload_sha256.hex(),
        "principals": list(vc.principals), "signers": [k.keyid.hex() for k in vc.authorized],
        "reason": vc.command.reason, "issued_at": vc.issued_at, "expires_at": vc.expires_at,
        **extra,
    }


def commit(ctx: Ctx, vc: VerifiedCommand, target: str, **extra: Any) -> None:
    """Make the replay entry and the accepted record durable before acting.

    Raises ReplayCacheIOError or AuditUnavailable, naming the path, when the
    disk refuses either; the refusal is recorded (it waits in memory if the
    disk refuses that too).
    """
    try:
        ctx.gate.replay.persist()
        ctx.audit.append_or_refuse("command", **accepted_fields(vc, target, **extra))
    except AgentdError as err:
        ctx.audit.append("command", decision="rejected", rpc=vc.action, target=target,
                         command_id=vc.command_id.hex(), principals=list(vc.principals),
                         error_code=err.code.name, error_reason=err.reason, error=err.message)
        raise


def result(ctx: Ctx, vc: VerifiedCommand, **fields: Any) -> bool:
    """The "result" record of a command; True once durable (never raises for the disk)."""
    fields.setdefault("ok", True)
    return ctx.audit.append("result", command_id=vc.command_id.hex(), **fields)


def record_stop(ctx: Ctx, vc: VerifiedCommand, target: str, outcome: dict[str, Any],
                **extra: Any) -> bool:
    """After a stop has acted: accepted and result records, then the replay entry.

    Runs on the recorder thread. True when all of it is durable; False when
    some waits for the disk (it is written, in order, once the disk takes it).
    """
    durable = ctx.audit.append("command", **accepted_fields(vc, target, **extra))
    durable = result(ctx, vc, **outcome) and durable
    return ctx.recorder.persist_replay() and durable


def record_failed(ctx: Ctx, vc: VerifiedCommand, target: str, err: BaseException) -> bool:
    """On the recorder thread: a stop that was admitted but failed to act, recorded as such."""
    message = err.message if isinstance(err, AgentdError) else f"internal error: {err!r}"
    return record_stop(ctx, vc, target, {"action": vc.action, "ok": False, "error": message})
