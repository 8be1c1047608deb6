"""verify(): the one place a signed command is checked.

Order matters. Cheap structural checks come first; the signatures are checked
over the raw payload bytes before they are parsed (protobuf encoding is not
canonical, so we never re-serialise); only then is the payload trusted enough
to parse and to judge its audience, times and roles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from agentd.dsse import COMMAND_PAYLOAD_TYPE, pae
from agentd.v1 import agentd_pb2
from cryptography.exceptions import InvalidSignature
from google.protobuf import message as _pb_message
from google.protobuf import timestamp_pb2
from google.protobuf.unknown_fields import UnknownFieldSet

from daemon.auth import policy
from daemon.auth._text import clip as _clip
from daemon.auth._text import iso_utc as _iso
from daemon.auth.truststore import TrustedKey, TrustStore
from daemon.errors import (
    BadSignature,
    EnvelopeTooLarge,
    Expired,
    InvalidArgument,
    MalformedCommand,
    NotYetValid,
    PermissionDenied,
    Unsigned,
    WrongAudience,
)

SIGNATURE_BYTES = 64
COMMAND_ID_BYTES = 16
# new_command() writes issued_at and expires_at as two rounded timestamps, so
# a command signed with exactly the maximum lifetime may exceed it by a
# nanosecond or so; a millisecond is far above that and far below mattering.
_LIFETIME_EPSILON_S = 1e-3


@dataclass(frozen=True)
class Limits:
    """Bounds verify() enforces. Defaults match the protocol documentation."""

    max_envelope_bytes: int = 65536
    max_signatures: int = 8
    max_lifetime_s: float = 300.0
    clock_skew_s: float = 60.0


@dataclass(frozen=True)
class VerifiedCommand:
    """A command whose signatures, audience, times and roles all checked out."""

    command: agentd_pb2.Command
    action: str
    # Distinct keys, by raw public key, whose signature verified.
    signers: tuple[TrustedKey, ...]
    principals: tuple[str, ...]
    # The signers whose roles allow the action; never empty.
    authorized: tuple[TrustedKey, ...]
    payload_sha256: bytes
    command_id: bytes
    issued_at: float
    expires_at: float


def verify(
    envelope: agentd_pb2.Envelope,
    *,
    trust: TrustStore,
    audience: str,
    expected_action: str,
    now: float,
    limits: Limits,
) -> VerifiedCommand:
    """Check a signed command envelope and return the command it carries.

    `expected_action` is the action the RPC performs ("run", "stop", "kill");
    `now` is unix seconds.

    Raises, in the order checked:
      EnvelopeTooLarge / InvalidArgument: too many bytes or signatures;
      MalformedCommand: wrong payload type;
      Unsigned: no signatures;
      BadSignature: a signature is not 64 bytes, or none verifies under a
        trusted key;
      MalformedCommand: the payload does not parse, carries unknown fields,
        has a bad command_id, no action or another action, or bad times;
      WrongAudience: addressed to another daemon;
      InvalidArgument: lifetime longer than limits.max_lifetime_s;
      NotYetValid / Expired: outside its validity window (with skew);
      PermissionDenied: no signer's role allows the action.
    Never raises a library exception.
    """
    _check_shape(envelope, limits)
    signers = _verified_signers(envelope, trust)
    command = _parse(envelope.payload)
    action = _check_action(command, expected_action)
    if command.audience != audience:
        raise WrongAudience(
            f"command is addressed to host {_clip(command.audience)} but this daemon is "
            f"{audience!r}; get the host id from 'agentctl info'"
        )
    issued_at, expires_at = _check_times(command, now, limits)
    authorized = _authorize(signers, action)
    return VerifiedCommand(
        command=command,
        action=action,
        signers=signers,
        principals=tuple(sorted({k.principal for k in signers})),
        authorized=authorized,
        payload_sha256=hashlib.sha256(envelope.payload).digest(),
        command_id=bytes(command.command_id),
        issued_at=issued_at,
        expires_at=expires_at,
    )


def _check_shape(envelope: agentd_pb2.Envelope, limits: Limits) -> None:
    size = envelope.ByteSize()
    if size > limits.max_envelope_bytes:
        raise EnvelopeTooLarge(
            f"envelope is {size} bytes; this daemon accepts at most "
            f"{limits.max_envelope_bytes} bytes"
        )
    count = len(envelope.signatures)
    if count > limits.max_signatures:
        raise InvalidArgument(
            f"envelope carries {count} signatures; this daemon accepts at most "
            f"{limits.max_signatures}"
        )
    if envelope.payload_type != COMMAND_PAYLOAD_TYPE:
        raise MalformedCommand(
            f"payload type is {_clip(envelope.payload_type)}, expected "
            f"{COMMAND_PAYLOAD_TYPE!r}; sign the command with agentctl"
        )
    if count == 0:
        raise Unsigned(
            "command is not signed; sign it with a key listed in this daemon's trust store"
        )
    for i, sig in enumerate(envelope.signatures, start=1):
        if len(sig.sig) != SIGNATURE_BYTES:
            raise BadSignature(
                f"signature {i} is {len(sig.sig)} bytes but an Ed25519 signature is "
                f"{SIGNATURE_BYTES}; the envelope is damaged or was not made by agentctl"
            )


def _verified_signers(envelope: agentd_pb2.Envelope, trust: TrustStore) -> tuple[TrustedKey, ...]:
    """The distinct trusted keys with a valid signature over PAE(type, payload).

    Each signature's key id picks the one key it is checked against; a
    signature whose key id names no trusted key costs no verification at all.
    The key id decides only which key is tried, never acceptance: the
    signature must still verify under that key. Without this, a keyless
    flood cost one Ed25519 verification per signature per trusted key (8
    signatures x every key, ~95 us each) for every envelope (issue 10).
    Signatures that verify under no trusted key are ignored (a co-signer may
    be trusted by another host) as long as one verifies. Raises BadSignature
    when none does, with the same message whatever the cause.
    """
    message = pae(envelope.payload_type, bytes(envelope.payload))
    # Keyed by raw key: a threshold or a principal list must count keys, not
    # signature entries or key ids (python-tuf, go-tuf and rust-tuf each once
    # counted one key twice; FIELD-NOTES.md "Signatures").
    found: dict[bytes, TrustedKey] = {}
    # Each trusted key is tried once per envelope: eight garbage signatures
    # naming one (public) key id cost one verification, not eight.
    tried: set[bytes] = set()
    for sig in envelope.signatures:
        key = trust.by_keyid(bytes(sig.keyid))
        if key is None or key.raw in tried:
            continue
        tried.add(key.raw)
        if _signature_ok(key, bytes(sig.sig), message):
            found[key.raw] = key
    if not found:
        ids = ", ".join(_short_keyid(bytes(s.keyid)) for s in envelope.signatures)
        raise BadSignature(
            f"no signature verifies under a trusted key ({len(envelope.signatures)} "
            f"signature(s); key ids {ids}). Is the signing key in the trust store?"
        )
    return tuple(found.values())


def _short_keyid(keyid: bytes) -> str:
    return keyid[:2].hex() + "…" if keyid else "(none)"


def _signature_ok(key: TrustedKey, signature: bytes, message: bytes) -> bool:
    try:
        key.public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _parse(payload: bytes) -> agentd_pb2.Command:
    """Parse the (already verified) payload. Raises MalformedCommand."""
    try:
        command = agentd_pb2.Command.FromString(payload)
    except (_pb_message.DecodeError, ValueError, RecursionError) as err:
        raise MalformedCommand(f"signed payload is not a valid Command: {err}") from err
    unknown = _unknown_field_numbers(command)
    if unknown:
        # A field this daemon does not understand might be a restriction the
        # signer meant to impose; ignoring it would run a different command
        # from the one signed.
        raise MalformedCommand(
            f"command carries fields this daemon does not understand (field numbers "
            f"{', '.join(map(str, sorted(unknown)))}); upgrade agentd or sign with a "
            "matching agentctl"
        )
    if len(command.command_id) != COMMAND_ID_BYTES:
        raise MalformedCommand(
            f"command_id is {len(command.command_id)} bytes, expected {COMMAND_ID_BYTES} "
            "random bytes"
        )
    return command


def _unknown_field_numbers(msg: _pb_message.Message) -> set[int]:
    """Numbers of unknown fields in `msg` and every message field it holds."""
    unknown = UnknownFieldSet(msg)
    numbers: set[int] = {unknown[i].field_number for i in range(len(unknown))}
    for descriptor, value in msg.ListFields():
        if descriptor.message_type is None:
            continue
        children = value if descriptor.is_repeated else [value]
        for child in children:
            numbers |= _unknown_field_numbers(child)
    return numbers


def _check_action(command: agentd_pb2.Command, expected: str) -> str:
    action = command.WhichOneof("action")
    if action is None:
        raise MalformedCommand(f"command names no action; expected a {expected!r} command")
    if action != expected:
        raise MalformedCommand(
            f"envelope holds a {action!r} command but was sent to {expected.capitalize()}"
        )
    return action


def _check_times(command: agentd_pb2.Command, now: float, limits: Limits) -> tuple[float, float]:
    """Return (issued_at, expires_at) in unix seconds after checking them."""
    if not command.HasField("issued_at") or not command.HasField("expires_at"):
        raise MalformedCommand("command must set both issued_at and expires_at")
    issued_at = _seconds(command.issued_at, "issued_at")
    expires_at = _seconds(command.expires_at, "expires_at")
    if expires_at <= issued_at:
        raise MalformedCommand(
            f"command expires ({_iso(expires_at)}) no later than it was issued ({_iso(issued_at)})"
        )
    lifetime = expires_at - issued_at
    if lifetime > limits.max_lifetime_s + _LIFETIME_EPSILON_S:
        raise InvalidArgument(
            f"lifetime {lifetime:.0f}s exceeds the daemon's maximum of "
            f"{limits.max_lifetime_s:.0f}s; sign a command with a shorter lifetime"
        )
    if issued_at > now + limits.clock_skew_s:
        raise NotYetValid(
            f"command was issued {issued_at - now:.0f}s in the future ({_iso(issued_at)}), "
            f"beyond the allowed clock skew of {limits.clock_skew_s:.0f}s; check clock sync "
            "(NTP) on this host and on the signer's machine"
        )
    if expires_at < now - limits.clock_skew_s:
        raise Expired(
            f"command expired at {_iso(expires_at)}, {now - expires_at:.0f}s ago "
            f"(allowed clock skew {limits.clock_skew_s:.0f}s); sign a new command"
        )
    return issued_at, expires_at


def _authorize(signers: tuple[TrustedKey, ...], action: str) -> tuple[TrustedKey, ...]:
    authorized = tuple(k for k in signers if policy.allows(k.roles, action))
    if not authorized:
        needed = ", ".join(sorted(policy.roles_for(action))) or "no role at all"
        who = ", ".join(f"{k.principal!r} (roles {k.roles_text()})" for k in signers)
        raise PermissionDenied(
            f"{action} refused: signed by {who}, but {action} needs one of: {needed}; "
            "have a key with such a role sign it"
        )
    return authorized


def _seconds(ts: timestamp_pb2.Timestamp, name: str) -> float:
    if not 0 <= ts.nanos < 1_000_000_000:
        raise MalformedCommand(f"{name} has nanos {ts.nanos}, outside 0..999999999")
    return ts.seconds + ts.nanos / 1e9
