"""The command gate: every signed command passes here before it acts.

verify (signature, audience, times, roles) then the replay cache, both
in memory. A rejection is audited here and raised; acceptance is audited by
the caller, after a kill has happened.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TypeVar

from agentd.v1 import agentd_pb2

from daemon.audit import AuditLog
from daemon.auth import Limits, ReplayCache, TrustStoreFile, VerifiedCommand, verify
from daemon.errors import AgentdError

T = TypeVar("T")


class CommandGate:
    def __init__(
        self,
        *,
        trust: TrustStoreFile,
        replay: ReplayCache,
        audit: AuditLog,
        host_id: str,
        limits: Limits,
    ) -> None:
        self.trust = trust
        self.replay = replay
        self.audit = audit
        self.host_id = host_id
        self.limits = limits

    def admit(
        self,
        envelope: agentd_pb2.Envelope,
        rpc_action: str,
        precheck: Callable[[VerifiedCommand], T] = lambda vc: None,  # type: ignore[assignment,return-value]
    ) -> tuple[VerifiedCommand, T]:
        """Verify, run precheck, then reserve the command id. Raises AgentdError (audited).

        precheck holds the state checks that may refuse an authentic command
        (latch, quorum, unknown agent, bad run spec). It runs before the
        command id is reserved, so a refused command changes nothing, not
        even the replay cache: an operator who sent a reset with too few
        signatures can cosign and send the same command again.
        """
        now = time.time()
        try:
            vc = verify(
                envelope,
                trust=self.trust.current(),
                audience=self.host_id,
                expected_action=rpc_action,
                now=now,
                limits=self.limits,
            )
            checked = precheck(vc)
            self.replay.check_and_reserve(
                command_id=vc.command_id,
                payload_sha256=vc.payload_sha256,
                expires_at=vc.expires_at,
                action=vc.action,
                now=now,
            )
        except AgentdError as err:
            self.audit_rejection(envelope, rpc_action, err)
            raise
        return vc, checked

    def audit_rejection(
        self, envelope: agentd_pb2.Envelope, rpc_action: str, err: AgentdError
    ) -> None:
        """Record a refused command: its hash, the key ids it claimed, and why."""
        self.audit.append(
            "command",
            decision="rejected",
            rpc=rpc_action,
            payload_sha256=hashlib.sha256(envelope.payload).hexdigest(),
            payload_type=envelope.payload_type[:200],
            keyids=[s.keyid.hex()[:64] for s in envelope.signatures[:16]],
            error_code=err.code.name,
            error_reason=err.reason,
            error=err.message,
        )

    def audit_accepted(self, vc: VerifiedCommand, target: str, **extra: object) -> None:
        """Record an accepted command: hash, signers, action, target and reason."""
        self.audit.append(
            "command",
            decision="accepted",
            rpc=vc.action,
            action=vc.action,
            target=target,
            command_id=vc.command_id.hex(),
            payload_sha256=vc.payload_sha256.hex(),
            principals=list(vc.principals),
            signers=[k.keyid.hex() for k in vc.authorized],
            reason=vc.command.reason,
            issued_at=vc.issued_at,
            expires_at=vc.expires_at,
            **extra,
        )
