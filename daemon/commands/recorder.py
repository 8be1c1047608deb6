"""The recorder: the one thread that writes what commands leave for the disk.

Stops, kills, estops and freezes act first; their audit records and replay
entries are written here afterwards, so the threads that kill never wait on
an fsync, on the audit log's lock, or on a disk that is full. Refusals are
written here too (daemon.commands.rejections). Every half second it also
retries what the disk refused before: waiting audit records, replay entries,
and anything else registered with retry() (the estop latch).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from daemon.audit import AuditLog
from daemon.auth import ReplayCache
from daemon.commands.rejections import Rejections
from daemon.errors import AgentdError

log = logging.getLogger(__name__)
T = TypeVar("T")
INTERVAL_S = 0.5


class Recorder:
    def __init__(self, audit: AuditLog, replay: ReplayCache, rejections: Rejections, *,
                 interval_s: float = INTERVAL_S) -> None:
        self.audit = audit
        self.replay = replay
        self.rejections = rejections
        self._interval = interval_s
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._retries: list[Callable[[], object]] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentd-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write everything still queued, summaries included, then end the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def retry(self, fn: Callable[[], object]) -> None:
        """Call fn on every pass (it retries a write of its own; must not raise)."""
        self._retries.append(fn)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn on the recorder thread, in order with every other write."""
        done: Future[T] = Future()
        self._jobs.put((fn, done))
        self._wake.set()
        return done

    def wake(self) -> None:
        self._wake.set()

    def persist_replay(self) -> bool:
        """Write reserved replay entries; False (logged, retried later) if the disk refuses."""
        try:
            self.replay.persist()
        except AgentdError as err:
            log.error("%s", err.message)
            return False
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            final = self._stopping.is_set()
            try:
                self._pass(final=final)
            except Exception:
                log.exception("recorder pass failed")
            if final:
                return

    def _pass(self, *, final: bool) -> None:
        while True:
            try:
                fn, done = self._jobs.get_nowait()
            except queue.Empty:
                break
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as err:  # handed to whoever waits on it
                    done.set_exception(err)
        for event, fields, written in self.rejections.take(final=final):
            # Each on its own: one that fails must not lose the others.
            try:
                self.audit.append(event, **fields)
            except Exception:
                log.exception("cannot record a refused command: %s", fields.get("error"))
            finally:
                written.set_result(None)
        if self.audit.pending:
            self.audit.flush()
        self.persist_replay()
        for fn in self._retries:
            try:
                fn()
            except Exception:
                log.exception("recorder retry %r failed", fn)
