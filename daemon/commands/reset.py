"""reset: clear the emergency-stop latch, if enough distinct principals signed. Restarts nothing."""

from __future__ import annotations

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.errors import FailedPrecondition, PermissionDenied


def run(ctx: Ctx, envelope: agentd_pb2.Envelope) -> tuple[str, ...]:
    """Admit (with the quorum), commit, clear the latch. Returns the principals."""
    def quorum(vc: VerifiedCommand) -> tuple[str, ...]:
        # Count distinct principals among the signers whose role allows a
        # reset; verify() already collapsed signatures to distinct keys.
        principals = tuple(sorted({k.principal for k in vc.authorized}))
        needed = ctx.cfg.reset_signatures
        if len(principals) < needed:
            raise PermissionDenied(
                f"reset needs signatures from {needed} distinct principals with role admin "
                f"or operator; this one has {len(principals)} ({', '.join(principals)}). "
                "Add one with 'agentctl cosign FILE --key OTHER_KEY'")
        return principals

    vc, principals = ctx.gate.admit(envelope, "reset", quorum)
    transaction.commit(ctx, vc, "*", reset_principals=list(principals),
                       was_latched=ctx.sup.latch.latched)
    try:
        ctx.sup.latch.clear()
    except OSError as err:
        failed = FailedPrecondition(
            f"the emergency-stop latch {ctx.sup.latch.path} could not be removed "
            f"({err.strerror}); it stays latched")
        transaction.result(ctx, vc, ok=False, error=failed.message)
        raise failed from err
    return principals
