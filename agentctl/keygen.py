"""Create an operator's Ed25519 key pair, in the files ssh-keygen would write.

The private key is OpenSSH format (so ``ssh-keygen -y -f KEY`` reads it and
existing ``~/.ssh/id_ed25519`` keys work as ``--key``), mode 0600; the public
key is the ``ssh-ed25519 BASE64 COMMENT`` line the daemon's trust store takes.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from agentd import dsse, signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentctl.errors import AgentctlError

TRUST_STORE = "/etc/agentd/trusted_keys"
ROLES = ("admin", "operator", "oncall")
# The trust store's principal syntax (daemon/auth/truststore.py).
_PRINCIPAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class KeyPair:
    """The files written and the lines an operator needs next."""

    private: Path
    public: Path
    public_line: str
    keyid: str
    trust_line: str


def default_comment() -> str:
    """``user@host``, as ssh-keygen would write."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def generate(out: Path, comment: str, *, force: bool) -> KeyPair:
    """Write a new key to *out* (0600) and its public line to ``OUT.pub`` (0644).

    Refuses to replace either file unless *force*. Raises AgentctlError.
    """
    pub = out.with_name(out.name + ".pub")
    if not force:
        for path in (out, pub):
            if path.exists() or path.is_symlink():
                raise AgentctlError(f"{path} already exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    try:
        line = signing.public_key_line(key, comment)
    except ValueError as err:
        raise AgentctlError(str(err)) from err
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write_new(out, private, 0o600, force=force)
    _write_new(pub, (line + "\n").encode(), 0o644, force=force)
    raw = key.public_key().public_bytes_raw()
    return KeyPair(
        private=out,
        public=pub,
        public_line=line,
        keyid=dsse.keyid(raw).hex(),
        trust_line=f"{_principal(comment)} oncall {line}",
    )


def _principal(comment: str) -> str:
    """A principal name for the trust-store hint: the comment's user part."""
    user = comment.split("@", 1)[0]
    return user if _PRINCIPAL.fullmatch(user) else "PRINCIPAL"


def _write_new(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Create *path* with *mode* and write *data*; never through a symlink.

    With *force*, an existing file is removed first rather than truncated, so
    the new one gets *mode* even if the old one was world-readable.
    """
    try:
        if force:
            path.unlink(missing_ok=True)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exactly mode, whatever the umask
            f.write(data)
    except FileExistsError as err:
        raise AgentctlError(f"{path} already exists; pass --force to replace it") from err
    except OSError as err:
        raise AgentctlError(f"cannot write {path}: {err.strerror}") from err
