"""The control channel's framing: one JSON object per SOCK_SEQPACKET packet, fds by SCM_RIGHTS.

Both ends use it: the service (which imports nothing above the standard
library but its own package) and the daemon's client. SEQPACKET keeps
message boundaries and fds attached to their message (unix(7)), so there is
no length prefix to get wrong and no fd that arrives before its message.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

MAX_PACKET = 64 * 1024
MAX_FDS = 16


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one message. Raises OSError (BlockingIOError if a non-blocking socket is full)."""
    data = encode(msg)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
        if fds else []
    sock.sendmsg([data], anc)


def encode(msg: dict[str, Any]) -> bytes:
    """The packet for msg. Raises ValueError if it is over MAX_PACKET."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise ValueError(f"control message of {len(data)} bytes is over {MAX_PACKET}")
    return data


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its fds (close-on-exec); None when the peer has closed.

    Raises ValueError for a packet that is not a JSON object (its fds are
    closed first), BlockingIOError on a non-blocking socket with nothing.
    """
    data, anc, flags, _ = sock.recvmsg(MAX_PACKET + 1, socket.CMSG_SPACE(4 * MAX_FDS),
                                       socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("control message truncated")
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise ValueError("control message is not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds
