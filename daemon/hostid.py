"""This daemon's host id: the audience every signed command must name."""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

from daemon import durable
from daemon.errors import ConfigError

_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def load_or_create(state_dir: Path, configured: str) -> tuple[str, bool]:
    """Return (host id, created now).

    A configured id wins. Otherwise the id is generated once (hostname plus
    random suffix, readable for humans, unique per state directory) and kept
    in state_dir/host_id. Wiping the state directory gives a new id, which
    also voids every command signed for the old one.

    Raises ConfigError for an invalid id or a host_id file that cannot be
    read or written.
    """
    if configured:
        if not _VALID.match(configured):
            raise ConfigError(f"host_id {configured!r} is not a valid id")
        return configured, False
    path = state_dir / "host_id"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    if text:
        if not _VALID.match(text):
            raise ConfigError(f"{path} holds an invalid host id; remove it to make a new one")
        return text, False
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:48] or "host"
    new = f"{host}-{secrets.token_hex(4)}"
    try:
        durable.replace(path, (new + "\n").encode("ascii"), mode=0o644)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}") from err
    return new, True
