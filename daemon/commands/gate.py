"""The command gate: every signed command passes here before it acts.

admit() verifies (signature, audience, times, roles), runs the command's
state precheck, then reserves the command id in the replay cache, all in
memory: nothing here waits on the disk. A refusal is handed to the
recorder (daemon.commands.rejections) and raised.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agentd.v1 import agentd_pb2

from daemon.auth import (
    STOP_ACTIONS,
    Limits,
    ReplayCache,
    TrustStoreFile,
    VerifiedCommand,
    verify,
)
from daemon.commands.recorder import Recorder
from daemon.errors import AgentdError

T = TypeVar("T")


class CommandGate:
    def __init__(self, *, trust: TrustStoreFile, replay: ReplayCache, recorder: Recorder,
                 host_id: str, limits: Limits) -> None:
        self.trust = trust
        self.replay = replay
        self.recorder = recorder
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
        vc: VerifiedCommand | None = None
        try:
            if rpc_action in STOP_ACTIONS:
                trust, broken = self.trust.for_stop()
            else:
                trust, broken = self.trust.current(), ""
            vc = verify(envelope, trust=trust, audience=self.host_id,
                        expected_action=rpc_action, now=now, limits=self.limits)
            if broken:
                command_id = vc.command_id.hex()
                self.recorder.submit(lambda: self.recorder.audit.append(
                    "trust_store_fallback", rpc=rpc_action, command_id=command_id,
                    error=broken))
            checked = precheck(vc)
            self.replay.check_and_reserve(
                command_id=vc.command_id, payload_sha256=vc.payload_sha256,
                expires_at=vc.expires_at, action=vc.action, now=now)
        except AgentdError as err:
            self.reject(envelope, rpc_action, err, vc)
            raise
        return vc, checked

    def reject(self, envelope: agentd_pb2.Envelope, rpc_action: str, err: AgentdError,
               vc: VerifiedCommand | None = None) -> None:
        """Record a refused command: its hash, the key ids it claimed, and why.

        The record is written by the recorder, not here; err.audit_written is
        done once it is (None when the refusal went into a summary).
        """
        fields: dict[str, Any] = {
            "decision": "rejected", "rpc": rpc_action,
            "payload_sha256": hashlib.sha256(envelope.payload).hexdigest(),
            "payload_type": envelope.payload_type[:200],
            "keyids": [s.keyid.hex()[:64] for s in envelope.signatures[:16]],
            "error_code": err.code.name, "error_reason": err.reason, "error": err.message,
        }
        if vc is not None:
            fields["principals"] = list(vc.principals)
            who = ",".join(vc.principals)
        elif envelope.signatures:
            # Not verified: the key id is only what the sender claims.
            who = "keyid " + envelope.signatures[0].keyid.hex()[:16]
        else:
            who = "unsigned"
        err.audit_written = self.recorder.rejections.note(fields, reason=err.reason, who=who)
        if err.audit_written is not None:
            self.recorder.wake()
