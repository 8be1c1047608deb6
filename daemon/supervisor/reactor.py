"""One epoll thread for every agent's output pipes and exit notifications.

A thread per agent would cost 1000 threads for 1000 agents; one selector
serves them all. Work that may wait (finalising an exited agent) is handed to
a small pool so the loop never blocks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from daemon.errors import LaunchFailed

log = logging.getLogger(__name__)

_READ_CHUNK = 65536


class Tap(Protocol):
    """Sees an agent's output as it is written (daemon.monitor.tripwires.OutputTap)."""

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class LogSink:
    """Appends an agent's output to a file, rotating once to FILE.1 at the cap.

    The agent writes to a pipe, never to the file: it cannot seek, truncate
    or grow the file past the cap, and the disk holds at most twice the cap.
    """

    def __init__(self, path: Path, cap: int, tap: Tap | None = None) -> None:
        """Create path, which must not exist. Raises LaunchFailed (it does, or cannot be made)."""
        self.path = path
        self.cap = cap
        self.tap = tap
        try:
            self._fd = _create(path)
        except OSError as err:
            raise LaunchFailed(f"cannot create the agent's log {path}: {err.strerror}") from err
        self._size = 0

    def write(self, data: bytes) -> None:
        if self.tap is not None:
            # The tripwires see each write before the file does. A tap that
            # fails must not stop the log, nor the loop every agent shares.
            try:
                self.tap.feed(data)
            except Exception:
                log.exception("output tap failed on %s", self.path)
        # An empty file is never rotated: a first read larger than the cap
        # would otherwise leave an empty FILE.1 and push the output's start out.
        if self._size and self._size + len(data) > self.cap:
            try:
                self._rotate()
            except OSError:
                log.exception("cannot rotate agent log %s; it grows past its cap", self.path)
        os.write(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        """FILE becomes FILE.1 and a new FILE is made; the descriptor is swapped last.

        Closing first and failing after would leave self._fd naming a closed
        number, which the next open anywhere in the daemon may reuse (a
        cgroup's held cgroup.kill, the audit log): the next write of agent
        bytes would land there. On failure the old file goes on (past the
        cap) and the next write tries again.
        """
        # rename(2) replaces FILE.1 itself, never what a symlink there names;
        # the open descriptor follows the file to its new name. (FILE may
        # be gone already: a rotation whose create failed.)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        new = _create(self.path)
        old, self._fd = self._fd, new
        self._size = 0
        os.close(old)

    def close(self) -> None:
        os.close(self._fd)
        if self.tap is not None:
            try:
                self.tap.close()
            except Exception:
                log.exception("output tap failed on %s", self.path)


def _create(path: Path) -> int:
    # O_EXCL | O_NOFOLLOW: root writes only to a file it has just made, never
    # through a symlink or a hard link planted at the path (open(2)).
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND
                   | os.O_CLOEXEC, 0o640)


Callback = Callable[[], None]


class KillGate:
    """Entered by a burst of kills (estop, expiring leases, shutdown) while it writes cgroup.kill.

    Kills never wait on it: entering only counts the burst (a lock held for
    an integer's update, never across I/O). The reactor holds off
    dispatching, and the sampler its sweep, until the burst is written, so
    that the reaping a kill sets off does not compete with the rest of the
    burst for the interpreter. (It was a Lock the reactor held across a whole
    batch of output writes: an estop then waited for a slow log disk.)
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._bursts = 0

    def __enter__(self) -> None:
        with self._cond:
            self._bursts += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._bursts -= 1
            if not self._bursts:
                self._cond.notify_all()

    def locked(self) -> bool:
        """A burst of kills is being written."""
        return self._bursts > 0

    def wait_clear(self, timeout: float) -> None:
        """Wait (up to timeout) until no burst is being written."""
        with self._cond:
            self._cond.wait_for(lambda: self._bursts == 0, timeout)


class Reactor:
    """The loop. Thread-safe registration through a queue and a wake-up pipe."""

    def __init__(self, workers: int = 8) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._todo: queue.SimpleQueue[Callback] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentd-reactor", daemon=True)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentd-final")
        self.last_tick = time.monotonic()
        self._tickers: list[Callable[[], object]] = []
        # Entered by a burst of kills; the loop holds off dispatching until
        # the burst is written. Kills never wait on it (KillGate).
        self.kill_gate = KillGate()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self.pool.shutdown(wait=True)

    def add_ticker(self, fn: Callable[[], object]) -> None:
        """Run fn on every loop pass (at least once a second); what it returns is ignored."""
        self._tickers.append(fn)

    def _call_soon(self, fn: Callback) -> None:
        self._todo.put(fn)
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def watch_output(self, fd: int, sink: LogSink) -> None:
        """Drain fd into sink until EOF, then close both."""
        os.set_blocking(fd, False)
        self._call_soon(lambda: self._register(fd, ("out", sink)))

    def watch_exit(self, pidfd: int, on_exit: Callback) -> None:
        """Call on_exit (in the pool) once the process behind pidfd has exited.

        A pidfd becomes readable when its process exits (pidfd_open(2)).
        """
        self._call_soon(lambda: self._register(pidfd, ("exit", on_exit)))

    def _register(self, fd: int, data: tuple[str, object]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, data)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0.5)
            except InterruptedError:
                continue
            for key, _ in events:
                self.kill_gate.wait_clear(timeout=1.0)
                self._dispatch(key)
            while True:
                try:
                    fn = self._todo.get_nowait()
                except queue.Empty:
                    break
                fn()
            self.last_tick = time.monotonic()
            for tick in self._tickers:
                try:
                    tick()
                except Exception:
                    log.exception("reactor ticker failed")

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        fd = int(key.fd)
        if key.data is None:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            return
        kind, target = key.data
        if kind == "out":
            self._drain(fd, target)
        else:
            self._sel.unregister(fd)
            os.close(fd)
            self.pool.submit(target)

    def _drain(self, fd: int, sink: LogSink) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                sink.write(data)
            except OSError:
                log.exception("cannot write agent log %s", sink.path)
            return
        self._sel.unregister(fd)
        os.close(fd)
        sink.close()
