"""Reading a child's one-shot message pipe: everything until EOF, within a deadline."""

from __future__ import annotations

import os
import select
import time


def read_until_eof(fd: int, timeout_s: float) -> bytes | None:
    """Read fd until EOF. Returns the bytes, or None if the deadline passed first.

    poll(2), not select(2): with hundreds of agents the daemon's fds pass
    FD_SETSIZE (1024), which select() cannot watch (select(2), BUGS).
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not poller.poll(remaining * 1000):
            continue
        data = os.read(fd, 4096)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
