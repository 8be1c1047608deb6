"""The signer's side: build, sign, co-sign and ship commands.

Shared by agentctl and the tests; it must not import the daemon. The payload
is serialised exactly once and every signature covers those bytes: protobuf
encoding is not canonical, so the daemon verifies the bytes it is given and
never re-serialises them.

Envelopes travel as standard DSSE JSON for offline signing
(`agentctl run --sign-only > cmd.json` on one machine, `agentctl send
cmd.json` on another):

    {"payloadType": ..., "payload": BASE64, "signatures": [{"keyid": HEX, "sig": BASE64}]}
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf import timestamp_pb2

from agentd.dsse import COMMAND_PAYLOAD_TYPE, keyid, pae
from agentd.v1 import agentd_pb2

_OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_PEM = b"-----BEGIN "


def new_command(
    *, audience: str, reason: str, now: float, lifetime_s: float = 300.0
) -> agentd_pb2.Command:
    """A command with a fresh random id, valid from `now` for `lifetime_s` seconds.

    The caller sets the action (`cmd.kill.name = ...`). Raises ValueError for
    a lifetime that is not positive and finite.
    """
    if not (math.isfinite(lifetime_s) and lifetime_s > 0):
        raise ValueError(f"lifetime must be a positive number of seconds, not {lifetime_s}")
    return agentd_pb2.Command(
        command_id=os.urandom(16),
        audience=audience,
        reason=reason,
        issued_at=_timestamp(now),
        expires_at=_timestamp(now + lifetime_s),
    )


def sign_command(command: agentd_pb2.Command, key: Ed25519PrivateKey) -> agentd_pb2.Envelope:
    """Serialise `command` once and wrap it in an envelope signed by `key`."""
    payload = command.SerializeToString()
    envelope = agentd_pb2.Envelope(payload=payload, payload_type=COMMAND_PAYLOAD_TYPE)
    envelope.signatures.append(_signature(envelope, key))
    return envelope


def cosign(envelope: agentd_pb2.Envelope, key: Ed25519PrivateKey) -> agentd_pb2.Envelope:
    """A copy of `envelope` with one more signature, by `key`, over the same payload.

    Raises ValueError if `key` already signed it: the daemon counts distinct
    keys, so a second signature by the same key adds nothing.
    """
    public = key.public_key()
    own_id = keyid(public.public_bytes_raw())
    message = pae(envelope.payload_type, envelope.payload)
    for sig in envelope.signatures:
        if sig.keyid == own_id or _verifies(public, sig.sig, message):
            raise ValueError(
                f"the envelope is already signed by this key (key id {own_id.hex()[:16]}…); "
                "a co-signature must come from a different key"
            )
    signed = agentd_pb2.Envelope()
    signed.CopyFrom(envelope)
    signed.signatures.append(_signature(signed, key))
    return signed


def envelope_to_json(envelope: agentd_pb2.Envelope) -> str:
    """The envelope in standard DSSE JSON form."""
    return json.dumps(
        {
            "payloadType": envelope.payload_type,
            "payload": base64.b64encode(envelope.payload).decode("ascii"),
            "signatures": [
                {"keyid": s.keyid.hex(), "sig": base64.b64encode(s.sig).decode("ascii")}
                for s in envelope.signatures
            ],
        },
        indent=2,
    )


def envelope_from_json(text: str) -> agentd_pb2.Envelope:
    """Parse DSSE JSON into an envelope. Checks form only, not signatures.

    Raises ValueError saying what is wrong: not JSON, a missing or mistyped
    field, bad base64 or hex.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"envelope is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError("envelope JSON must be an object with payloadType, payload, signatures")
    payload_type = _field(obj, "payloadType", str, "envelope")
    payload = _b64(_field(obj, "payload", str, "envelope"), "payload")
    signatures = _field(obj, "signatures", list, "envelope")
    envelope = agentd_pb2.Envelope(payload=payload, payload_type=payload_type)
    for i, entry in enumerate(signatures, start=1):
        where = f"signature {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with keyid and sig")
        # DSSE makes keyid optional; ours is only a hint anyway.
        hint = entry.get("keyid", "")
        if not isinstance(hint, str):
            raise ValueError(f"{where}: keyid must be a hex string")
        try:
            raw_id = bytes.fromhex(hint)
        except ValueError as err:
            raise ValueError(f"{where}: keyid is not hex") from err
        sig = _b64(_field(entry, "sig", str, where), f"{where} sig")
        envelope.signatures.append(agentd_pb2.Signature(keyid=raw_id, sig=sig))
    return envelope


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key in OpenSSH format or PEM PKCS#8.

    A passphrase given for an unencrypted key is ignored. Raises ValueError
    when the file cannot be read, is not a private key, is not Ed25519, is
    encrypted and no passphrase was given, or the passphrase is wrong.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read key {path}: {err.strerror}") from err
    stripped = data.lstrip()
    if stripped.startswith(b"ssh-"):
        raise ValueError(f"{path} is a public key; give the private key (without .pub)")
    if stripped.startswith(_OPENSSH_PRIVATE):
        loader: Any = serialization.load_ssh_private_key
    elif stripped.startswith(_PEM):
        loader = serialization.load_pem_private_key
    else:
        raise ValueError(f"{path} is not an OpenSSH or PEM private key")
    try:
        key = _load(loader, data, passphrase, path)
    except TypeError:
        # pyca raises TypeError both for a missing passphrase and for one
        # given to an unencrypted key; only the first is an error here.
        if passphrase is None:
            raise ValueError(f"key {path} is encrypted and no passphrase was given") from None
        key = _load(loader, data, None, path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            f"key {path} is a {type(key).__name__}; agentd needs an Ed25519 key "
            "(ssh-keygen -t ed25519)"
        )
    return key


def public_key_line(key: Ed25519PrivateKey | Ed25519PublicKey, comment: str = "") -> str:
    """`ssh-ed25519 BASE64 COMMENT`, the key part of a trust-store line.

    Raises ValueError for a comment with a line break: it would smuggle a
    second line into the trust store.
    """
    if "\n" in comment or "\r" in comment:
        raise ValueError("a key comment must not contain a line break")
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    line = public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return f"{line} {comment}" if comment else line


def _signature(envelope: agentd_pb2.Envelope, key: Ed25519PrivateKey) -> agentd_pb2.Signature:
    return agentd_pb2.Signature(
        keyid=keyid(key.public_key().public_bytes_raw()),
        sig=key.sign(pae(envelope.payload_type, envelope.payload)),
    )


def _load(loader: Any, data: bytes, passphrase: bytes | None, path: Path) -> Any:
    """Call a pyca loader; map its ValueError to ours, let its TypeError through."""
    try:
        return loader(data, password=passphrase)
    except (ValueError, UnsupportedAlgorithm) as err:
        if passphrase is not None:
            raise ValueError(f"cannot load key {path}: wrong passphrase or damaged key") from err
        raise ValueError(f"cannot load key {path}: {err}") from err


def _verifies(public: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        public.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    if not math.isfinite(t):
        raise ValueError(f"time must be finite, not {t}")
    seconds = math.floor(t)
    nanos = min(round((t - seconds) * 1e9), 999_999_999)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in obj:
        raise ValueError(f"{where} has no {name!r} field")
    value = obj[name]
    if not isinstance(value, kind):
        raise ValueError(f"{where}: {name!r} must be a {kind.__name__}")
    return value


def _b64(text: str, what: str) -> bytes:
    # DSSE allows either standard or URL-safe base64.
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as err:
        raise ValueError(f"{what} is not valid base64") from err
