"""Ed25519 public keys: parse the OpenSSH form and refuse weak keys.

Every key the daemon trusts passes through here, so this is where a key that
would let anyone forge a signature is stopped.
"""

from __future__ import annotations

import base64
import binascii
import struct

import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.auth._text import clip as _clip

KEY_TYPE = "ssh-ed25519"
RAW_KEY_BYTES = 32


class InvalidKey(ValueError):
    """A public key is malformed, of the wrong type, or weak.

    Internal to the auth layer: the trust store turns it into a
    TrustStoreError that names the file and line.
    """


def parse_openssh_public_key(text: str) -> bytes:
    """Return the raw 32-byte key of an OpenSSH public key `ssh-ed25519 BASE64 [COMMENT]`.

    Raises InvalidKey if the type is not ssh-ed25519, the base64 is malformed,
    the blob's embedded key type disagrees with the outer one, or the key is
    not an Ed25519 key of exactly 32 bytes. Does not judge the key's strength:
    call check_strong() for that.
    """
    fields = text.split(None, 2)
    if len(fields) < 2:
        raise InvalidKey("expected 'ssh-ed25519 BASE64'; the key is incomplete")
    key_type, blob_b64 = fields[0], fields[1]
    if key_type != KEY_TYPE:
        raise InvalidKey(f"key type {_clip(key_type, 40)} is not supported; only {KEY_TYPE}")
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidKey(f"the key is not valid base64 ({err})") from err
    # The blob repeats the key type (RFC 4253 §6.6). Check it ourselves: an
    # outer "ssh-ed25519" over some other blob is a copy-paste error we want
    # to name precisely, not a generic parse failure.
    inner = _embedded_key_type(blob)
    if inner != KEY_TYPE.encode():
        raise InvalidKey(
            f"the key says {KEY_TYPE} but its base64 blob holds a {_clip(inner, 40)} key; "
            "copy the whole line from the signer's .pub file"
        )
    try:
        key = serialization.load_ssh_public_key(f"{key_type} {blob_b64}".encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as err:
        raise InvalidKey(f"the key cannot be parsed ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidKey(f"the key is a {type(key).__name__}, not an Ed25519 key")
    raw = key.public_bytes_raw()
    if len(raw) != RAW_KEY_BYTES:  # pragma: no cover - pyca guarantees 32
        raise InvalidKey(f"the key is {len(raw)} bytes, not {RAW_KEY_BYTES}")
    return raw


def check_strong(raw: bytes) -> None:
    """Refuse an Ed25519 public key that does not bind signatures to a secret.

    Raises InvalidKey for a key that is not 32 bytes, a non-canonical
    encoding, a point of small order (the identity, points of order 2, 4, 8)
    or a point with a small-order component (outside the prime-order
    subgroup).
    """
    if len(raw) != RAW_KEY_BYTES:
        raise InvalidKey(f"the key is {len(raw)} bytes, not {RAW_KEY_BYTES}")
    # pyca/cryptography's Ed25519 verify ACCEPTS the forged signature
    # (R = identity, S = 0) over any message under the identity public key
    # 01 00..00 -- checked on this project's build machine with
    # cryptography 50 (see FIELD-NOTES.md, "Signatures"). So anyone could
    # sign for such a key. libsodium's check refuses small-order points,
    # non-canonical encodings and points outside the prime-order subgroup.
    if not bool(nacl.bindings.crypto_core_ed25519_is_valid_point(raw)):
        raise InvalidKey(
            "the key is a weak Ed25519 point (small order, non-canonical, or outside the "
            "prime-order subgroup) under which signatures can be forged; "
            "generate a new key with 'ssh-keygen -t ed25519'"
        )


def _embedded_key_type(blob: bytes) -> bytes:
    """Return the key-type string at the start of an SSH public-key blob."""
    if len(blob) < 4:
        raise InvalidKey("the key's base64 blob is too short to be an SSH key")
    (length,) = struct.unpack(">I", blob[:4])
    if length > len(blob) - 4:
        raise InvalidKey("the key's base64 blob is truncated")
    return blob[4 : 4 + length]
