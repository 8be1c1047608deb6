"""DSSE v1 pre-authentication encoding, shared by the signer and the verifier.

PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, with
lengths in ASCII decimal (https://github.com/secure-systems-lab/dsse,
protocol.md). Signing PAE rather than the bare payload binds the payload
type, so a signed blob of one type cannot be passed off as another.
"""

from __future__ import annotations

import hashlib

COMMAND_PAYLOAD_TYPE = "application/vnd.agentd.command.v1+protobuf"


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding of (payload_type, payload)."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def keyid(raw_public_key: bytes) -> bytes:
    """Key id: sha256 of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(raw_public_key).digest()
