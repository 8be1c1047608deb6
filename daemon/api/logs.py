"""An agent's captured output for the Logs RPC: the tail of its log files, then what follows.

The reactor's LogSink appends each stream to FILE and, at the cap, renames
FILE to FILE.1 and starts a new FILE (daemon.supervisor.reactor). Reading
follows that: the tail may begin in FILE.1, and a follower that finds FILE
replaced drains the file it holds open (the old one, now FILE.1) before it
moves to the new one, so nothing between two polls is lost unless FILE
rotated twice within one poll (a writer faster than cap / POLL_S).

The files are root's (the state directory is 0700): the daemon reads them on
the client's behalf, and the control socket's mode is the gate, as for the
other read-only calls.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import FailedPrecondition

if TYPE_CHECKING:
    from daemon.supervisor.agent import Agent

DEFAULT_TAIL = 64 * 1024
# A larger tail is cut to this: a follower's tail is read into memory, and
# 100 followers asking 16 MiB each held the API for seconds (issue 10).
MAX_TAIL = 1024 * 1024
CHUNK = 64 * 1024  # bytes per LogChunk message
POLL_S = 0.1
# After the agent ended, the reactor may still be draining its pipes: stop
# following only after this many polls in a row found nothing new.
_IDLE_POLLS_AFTER_END = 3

Chunk = tuple[str, bytes]  # (stream, data)


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise FailedPrecondition(f"cannot read agent log {path}: {err.strerror}") from err


def _read_at(fd: int, offset: int, n: int) -> bytes:
    out = []
    while n > 0:
        data = os.pread(fd, min(n, CHUNK), offset)
        if not data:
            break
        out.append(data)
        offset += len(data)
        n -= len(data)
    return b"".join(out)


class _Follower:
    """One stream's current file, held open, and how far it has been sent."""

    def __init__(self, stream: str, path: Path) -> None:
        self.stream = stream
        self.path = path
        self.fd = _open(path)
        self.pos = os.fstat(self.fd).st_size if self.fd is not None else 0

    def tail(self, n: int) -> bytes:
        """The last n bytes written before this follower was opened (FILE.1, then FILE)."""
        if n <= 0:
            return b""
        current = b""
        if self.fd is not None:
            # Up to pos only: what was appended since belongs to the first poll.
            start = max(0, self.pos - n)
            current = _read_at(self.fd, start, self.pos - start)
        older = b""
        if len(current) < n:
            fd1 = _open(self.path.with_name(self.path.name + ".1"))
            if fd1 is not None:
                try:
                    size = os.fstat(fd1).st_size
                    want = n - len(current)
                    older = _read_at(fd1, max(0, size - want), want)
                finally:
                    os.close(fd1)
        return older + current

    def poll(self) -> Iterator[bytes]:
        """Whatever was appended since the last poll, across a rotation."""
        if self.fd is None:
            self.fd = _open(self.path)
            self.pos = 0
            if self.fd is None:
                return
        # Look for a rotation first: once FILE is a new file, the one held
        # open is complete, so draining it and then switching loses nothing.
        try:
            rotated = os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            rotated = False
        yield from self._drain()
        if rotated:
            os.close(self.fd)
            self.fd = _open(self.path)
            self.pos = 0
            if self.fd is not None:
                yield from self._drain()

    def _drain(self) -> Iterator[bytes]:
        assert self.fd is not None
        while True:
            data = os.pread(self.fd, CHUNK, self.pos)
            if not data:
                return
            self.pos += len(data)
            yield data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def stream(agent: Agent, *, tail_bytes: int, follow: bool,
           active: Callable[[], bool], poll_s: float = POLL_S) -> Iterator[Chunk]:
    """Yield (stream, data): each stream's tail, then (follow) new output until the end.

    Following ends once the agent has ended and nothing more arrives, or
    active() turns false (the client went away). Raises FailedPrecondition
    if a log file exists but cannot be read. Sleeps between polls: for a
    thread; the API steps through chunks() on its work lane.
    """
    for chunk in chunks(agent, tail_bytes=tail_bytes, follow=follow, active=active):
        if chunk is None:
            time.sleep(poll_s)
        else:
            yield chunk


def chunks(agent: Agent, *, tail_bytes: int, follow: bool,
            active: Callable[[], bool]) -> Generator[Chunk | None, None, None]:
    """The chunks of stream(), and None where it waits one poll for more.

    Each step reads files: the API runs it on the work lane, one step at a
    time, never on its loop. The tail is at most MAX_TAIL.
    """
    n = min(tail_bytes or DEFAULT_TAIL, MAX_TAIL)
    followers = [_Follower("stdout", agent.stdout_log), _Follower("stderr", agent.stderr_log)]
    try:
        for f in followers:
            data = f.tail(n)
            for i in range(0, len(data), CHUNK):
                yield f.stream, data[i:i + CHUNK]
        if not follow:
            return
        idle = 0
        while active():
            got = False
            for f in followers:
                for data in f.poll():
                    got = True
                    yield f.stream, data
            if agent.ended.is_set():
                idle = 0 if got else idle + 1
                if idle >= _IDLE_POLLS_AFTER_END:
                    return
            yield None
    finally:
        for f in followers:
            f.close()
