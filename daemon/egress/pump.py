"""Bytes between two connected sockets through a pipe with splice(2): no copy to user space.

splice(2) moves pages socket -> pipe -> socket inside the kernel; the pipe
is set to CHUNK (F_SETPIPE_SZ, fcntl(2)) so one call moves up to that
much. Every call is non-blocking (the sockets are O_NONBLOCK, and
SPLICE_F_NONBLOCK for the pipe) and the loop waits with add_reader /
add_writer, so one event loop pumps every flow and none can stall another.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

CHUNK = 128 * 1024
_F_SETPIPE_SZ = 1031  # <linux/fcntl.h>
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Called with each chunk's size before it is moved; returns how many bytes
# may move now (0: the cap is reached, stop).
Budget = Callable[[int], int]


async def _wait(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Over /proc/sys/fs/pipe-max-size for a non-root caller: the default 64 KiB.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, CHUNK)
    return r, w


async def one_way(src: socket.socket, dst: socket.socket, budget: Budget,
                  count: Callable[[int], None]) -> str:
    """Move bytes src -> dst until src's EOF (then shut dst's write side) or the budget ends.

    count(n) is called after n bytes reached dst. Returns "eof" or "cap".
    Raises OSError on a reset or other socket error.
    """
    r, w = _pipe()
    try:
        pending = 0
        while True:
            if pending == 0:
                want = budget(CHUNK)
                if want <= 0:
                    return "cap"
                try:
                    n = os.splice(src.fileno(), w, want, flags=_FLAGS)
                except BlockingIOError:
                    await _wait(src.fileno(), write=False)
                    continue
                if n == 0:
                    with contextlib.suppress(OSError):  # the peer is gone: nothing to tell
                        dst.shutdown(socket.SHUT_WR)
                    return "eof"
                pending = n
            try:
                m = os.splice(r, dst.fileno(), pending, flags=_FLAGS)
            except BlockingIOError:
                await _wait(dst.fileno(), write=True)
                continue
            pending -= m
            count(m)
    finally:
        os.close(r)
        os.close(w)
