"""The operator's signing key: find it, unlock it, sign commands with it.

The cryptography lives in agentd.signing; this module adds what a CLI needs
around it: where the key comes from, asking for a passphrase, and one-line
errors.
"""

from __future__ import annotations

import base64
import os
import struct
import sys
from pathlib import Path

import click
from agentd import signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentctl.errors import AgentctlError

NO_KEY = "no signing key: pass --key PATH or set AGENTCTL_KEY"
PASSPHRASE_ENV = "AGENTCTL_KEY_PASSPHRASE"  # noqa: S105  # a variable name, not a secret

_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"


def load_key(path: Path | None) -> Ed25519PrivateKey:
    """Load the signing key at *path*, asking for its passphrase if it needs one.

    The passphrase comes from $AGENTCTL_KEY_PASSPHRASE, else from a prompt on
    the terminal (on stderr: stdout may carry a signed envelope). Raises
    AgentctlError with one line saying what is wrong.
    """
    if path is None:
        raise AgentctlError(NO_KEY)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AgentctlError(f"cannot read signing key {path}: {err.strerror}") from err
    passphrase: bytes | None = None
    if _is_encrypted(data):
        passphrase = _passphrase(path)
    try:
        return signing.load_private_key(path, passphrase)
    except ValueError as err:
        raise AgentctlError(f"cannot use signing key: {err}") from err


def _passphrase(path: Path) -> bytes:
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env is not None:
        return from_env.encode()
    if not sys.stdin.isatty():
        raise AgentctlError(
            f"signing key {path} is encrypted: set {PASSPHRASE_ENV} "
            "or run agentctl on a terminal to be asked"
        )
    text: str = click.prompt(f"passphrase for {path}", hide_input=True, err=True)
    return text.encode()


def _is_encrypted(data: bytes) -> bool:
    """Whether a private key file needs a passphrase (OpenSSH or PKCS#8 PEM).

    Decided from the key's own header, so a damaged key is reported as
    damaged rather than met with a passphrase prompt.
    """
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        return True
    start = data.find(_OPENSSH_BEGIN)
    if start < 0:
        return False
    body = data[start + len(_OPENSSH_BEGIN) :].split(b"-----END", 1)[0]
    try:
        blob = base64.b64decode(b"".join(body.split()))
    except ValueError:
        return False  # damaged: let the loader say so
    # openssh-key-v1 layout (PROTOCOL.key): magic, then string ciphername.
    if not blob.startswith(_OPENSSH_MAGIC) or len(blob) < len(_OPENSSH_MAGIC) + 4:
        return False
    (n,) = struct.unpack_from(">I", blob, len(_OPENSSH_MAGIC))
    cipher = blob[len(_OPENSSH_MAGIC) + 4 : len(_OPENSSH_MAGIC) + 4 + n]
    return cipher != b"none"
