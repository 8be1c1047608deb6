"""The daemon's append-only, hash-chained audit log.

The record format and the verifier live in :mod:`agentd.auditchain` so that
agentctl can check a log without the daemon. This module owns the file: it
opens or repairs the chain at start, appends records durably, and keeps the
head file (``PATH.head``) that reveals trailing truncation.

Ordering that matters: the daemon appends *after* a kill, never before it, so
a slow disk cannot delay a kill; and each append writes and fsyncs the record
before it replaces the head file, so a head never names a record that is not
on disk (after a crash the head may lag the log by one record; the verifier
accepts a head that lags).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from agentd import auditchain

from daemon import durable
from daemon.errors import AuditUnavailable, AuditWriteError

_log = logging.getLogger(__name__)

# Enough of the old chain's problems to act on; the file itself keeps the rest.
_MAX_PROBLEMS_RECORDED = 20
# Records kept in memory while the disk refuses them (a few hundred bytes each).
MAX_BACKLOG = 100_000
# Records written per fsync, and per hold of the log's lock, when a backlog drains.
FLUSH_CHUNK = 1000


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """An open audit log: append records to the chain, one line each.

    Create with :meth:`open`. Thread-safe: one lock orders appends.
    """

    def __init__(
        self, path: Path, fd: int, seq: int, head_hash: str, clock: Callable[[], datetime]
    ) -> None:
        """Wrap an open descriptor; use :meth:`open` instead."""
        self._path = path
        self._fd = fd
        # (seq, hash) of the newest record, replaced as one tuple so readers
        # need no lock (Info must not wait behind an fsync).
        self._head = (seq, head_hash)
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        # Records the disk has not taken yet, in order, unchained:
        # (event, ts, fields). See append().
        self._backlog: deque[tuple[str, datetime, dict[str, Any]]] = deque()
        self._dropped: list[Any] = [0, ""]  # [count, first event] past MAX_BACKLOG
        self._failing = ""  # why the last write failed; "" when healthy
        self._unsynced = False  # lines written since the last fsync and head

    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call fn(record) after each durable append (events, metrics).

        fn runs on the appending thread, outside the log's lock; it must be
        quick and must not raise (an exception is logged and dropped).
        """
        self._listeners.append(fn)

    # ------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], datetime] = _utcnow) -> Self:
        """Open the log at *path*, continuing its chain or starting one.

        Creates the parent directory (0750) and the file (0600) if missing.
        An existing log is verified, against ``PATH.head`` when present; a
        head may lag the log by one record (a crash between the append and
        the head update), never more. If it fails, it is moved aside to
        ``PATH.broken-<unix time>`` (with its head file, as
        ``PATH.broken-<unix time>.head``) and a new chain starts with
        an ``audit_chain_broken`` record naming it: the kill switch must stay
        available, so a bad log never stops the daemon. *clock* gives the
        records' ``ts``.

        Raises AuditWriteError if the file cannot be created, read or moved.
        """
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            seq, head_hash, broken = _recover(path, int(clock().timestamp()))
            fd = _open_append(path)
        except OSError as err:
            raise AuditWriteError(f"cannot open audit log {path}: {err}") from err
        log = cls(path, fd, seq, head_hash, clock)
        try:
            if broken is not None:
                _log.warning("audit log %s failed verification and was set aside as %s: %s",
                             path, broken["broken_log"], "; ".join(broken["problems"]))
                log.append("audit_chain_broken", **broken)
            else:
                # Bring a lagging or missing head file up to date with the log.
                log._write_head()
        except BaseException:
            log.close()
            raise
        return log

    # ------------------------------------------------------------ appending
    def append(self, event: str, **fields: Any) -> bool:
        """Add one record to the chain; True once it is durable, False if it waits.

        Values must be JSON-serialisable (convert bytes to hex at the call
        site): TypeError or ValueError for a bad field, before anything is
        written. Never raises for the disk: a record the disk does not take
        (full, read-only, failing) waits in memory, unchained, with every
        later one behind it in order, and is written by the next append or
        flush() that succeeds (issue 10: a full disk must not turn a kill
        into an error). Past MAX_BACKLOG waiting records, further ones are
        counted, not kept, and an ``audit_records_dropped`` record says how
        many when the disk is back.
        """
        ts = self._clock()
        auditchain.encode_record(seq=0, prev=auditchain.GENESIS, event=event, ts=ts,
                                 fields=fields)  # raises for a bad field, before anything
        with self._lock:
            if self._fd < 0:
                raise AuditWriteError(f"cannot write audit log {self._path}: it is closed")
            if len(self._backlog) < MAX_BACKLOG:
                self._backlog.append((event, ts, fields))
                mine = True
            else:
                self._dropped[0] += 1
                self._dropped[1] = self._dropped[1] or event
                mine = False
            self._flush_locked()
            # Read under the lock: another append may move the head at once.
            durable = mine and not self._backlog and not self._unsynced
            seq = self._head[0]
        # Listeners (events, metrics, journal) hear of a waiting record at
        # once, marked as such; it is not repeated when it reaches the disk.
        record: dict[str, Any] = {"ts": ts.timestamp(), "event": event, **fields}
        if durable:
            record["seq"] = seq
        else:
            record["audit_pending"] = True
        self._notify(record)
        return durable

    def append_or_refuse(self, event: str, **fields: Any) -> None:
        """Append one record and make it durable, or raise AuditUnavailable.

        For commands that start or loosen something (run, thaw, renew,
        reset): they act only once their record is on disk, and are refused,
        naming the path and the error, while the log cannot be written. A
        record the disk refused is not added. One whose line was written but
        could not be made durable (fsync, head) stays in the chain, and the
        caller's refusal record follows it.
        """
        ts = self._clock()
        with self._lock:
            self._flush_locked()
            if self._backlog or self._failing or self._unsynced:
                raise AuditUnavailable(self._unavailable_message())
            try:
                self._chain_line(event, ts, fields)
                self._sync_and_write_head()
                self._unsynced = False
            except AuditWriteError as err:
                self._failing = err.message
                raise AuditUnavailable(self._unavailable_message()) from err
            seq = self._head[0]
        self._notify({"seq": seq, "ts": ts.timestamp(), "event": event, **fields})

    def flush(self) -> bool:
        """Write what waits, if the disk takes it now. True when nothing is left waiting.

        In chunks of FLUSH_CHUNK records, the lock let go between them: a
        long backlog never holds the log (and the commands that wait on it)
        for the whole of its writing.
        """
        while True:
            with self._lock:
                wrote = self._flush_locked()
                done = not self._backlog and not self._failing and not self._unsynced
            if done or not wrote:
                return done

    @property
    def pending(self) -> int:
        """Records waiting for the disk (0 when the log is healthy)."""
        return len(self._backlog)

    def _unavailable_message(self) -> str:
        return (f"the audit log {self._path} cannot be written ({self._failing}); "
                f"{len(self._backlog)} record(s) wait in memory. Commands that start or "
                "loosen (run, thaw, renew, reset) are refused until it can be written; "
                "stop, kill, estop and freeze still act. Free space on that file system")

    def _flush_locked(self) -> int:
        """Write up to FLUSH_CHUNK waiting records in order, then any drop count, then sync.

        One fsync and one head file for the whole chunk. A record leaves the
        backlog as soon as its line is in the file, never twice: if the sync
        or the head fails after that, the lines stay in the chain (not yet
        durable) and the next flush syncs them. Returns how many were written.
        """
        wrote = 0
        try:
            while self._backlog and wrote < FLUSH_CHUNK:
                event, ts, fields = self._backlog[0]
                self._chain_line(event, ts, fields)
                self._backlog.popleft()
                wrote += 1
            if self._dropped[0] and not self._backlog:
                count, first = self._dropped
                self._chain_line("audit_records_dropped", self._clock(),
                                 {"count": count, "first_event": first,
                                  "max_backlog": MAX_BACKLOG})
                self._dropped = [0, ""]
                wrote += 1
            if self._unsynced or (self._failing and not self._backlog):
                # New lines, or earlier ones written but not made durable.
                self._sync_and_write_head()
                self._unsynced = False
        except AuditWriteError as err:
            if not self._failing:
                _log.error("audit log unwritable, records wait in memory: %s", err.message)
            self._failing = err.message
            return wrote
        if self._failing and not self._backlog:
            _log.warning("audit log %s writable again", self._path)
            self._failing = ""
        return wrote

    def _chain_line(self, event: str, ts: datetime, fields: dict[str, Any]) -> None:
        """Chain and write one record's line (not yet synced). Under the lock.

        A line the disk refused is cut off and not chained (AuditWriteError).
        """
        seq, prev = self._head
        line = auditchain.encode_record(seq=seq + 1, prev=prev, event=event, ts=ts,
                                        fields=fields)
        self._write_line(line + b"\n")
        self._head = (seq + 1, auditchain.record_hash(line))
        self._unsynced = True

    def _notify(self, record: dict[str, Any]) -> None:
        for fn in self._listeners:
            try:
                fn(record)
            except Exception:
                _log.exception("audit listener failed")

    def _write_line(self, data: bytes) -> None:
        """Write one whole line; on failure, cut off any partial line."""
        try:
            start = os.fstat(self._fd).st_size
        except OSError as err:
            raise AuditWriteError(f"cannot write audit log {self._path}: {err}") from err
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as err:
            # A partial line would glue itself to the next record and break
            # the chain for good. Only we write this file (under the lock).
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise AuditWriteError(f"cannot write audit log {self._path}: {err}") from err

    def _sync_and_write_head(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise AuditWriteError(
                f"audit record {self._head[0]} written but not made durable "
                f"(fsync {self._path}): {err}"
            ) from err
        self._write_head()

    def _write_head(self) -> None:
        """Replace the head file atomically and durably (durable.replace)."""
        head = auditchain.head_path(self._path)
        try:
            durable.replace(head, auditchain.encode_head(*self._head), mode=0o600)
        except OSError as err:
            raise AuditWriteError(
                f"audit record {self._head[0]} written but head file {head} not updated: {err}"
            ) from err

    # ------------------------------------------------------------ accessors
    @property
    def head(self) -> tuple[int, str]:
        """``(seq, sha256)`` of the newest record; ``(-1, GENESIS)`` if none."""
        return self._head

    @property
    def records(self) -> int:
        """Number of records in the chain."""
        return self.head[0] + 1

    @property
    def path(self) -> Path:
        """Where the log lives."""
        return self._path

    def close(self) -> None:
        """Close the file. Appending afterwards raises AuditWriteError."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_append(path: Path) -> int:
    """Open *path* for appending, creating it 0600 (durably) if missing."""
    # O_APPEND: every write lands at the end, whatever else has the file open.
    # O_NOFOLLOW: a symlink planted at the log path must not redirect root's
    # writes. O_CLOEXEC: agents must never inherit the log's descriptor.
    try:
        return durable.create_exclusive(path, mode=0o600, append=True)
    except FileExistsError:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)


def _recover(path: Path, now: int) -> tuple[int, str, dict[str, Any] | None]:
    """Find where the chain at *path* ends; move a broken log aside.

    Returns ``(seq, hash)`` of the newest record to continue from, and the
    fields of the ``audit_chain_broken`` record to start a new chain with, or
    None if the log is missing, empty or intact. Raises OSError.
    """
    head_file = auditchain.head_path(path)
    problems: list[str] = []
    expected: tuple[int, str] | None = None
    try:
        expected = auditchain.read_head(head_file)
    except FileNotFoundError:
        pass  # a new log, or the head was removed: trailing truncation undetectable
    except ValueError as err:
        problems.append(f"head file unusable: {err}")
    unread = auditchain.VerifyReport(ok=False, records=0, head=auditchain.GENESIS, last_seq=-1)
    if not path.exists():
        if expected is None or expected[0] < 0:
            return -1, auditchain.GENESIS, None
        # The head outlived its log: the whole log was deleted.
        problems.append(f"log is missing but its head says {expected[0] + 1} records: deleted")
        report = unread
    else:
        try:
            report = auditchain.verify(path, expected_head=expected)
        except OSError as err:
            # Unreadable (EIO, EACCES): set it aside like a broken one rather
            # than keep the daemon, and so the kill switch, from starting.
            report = unread
            problems.append(f"cannot read the log: {err}")
        problems.extend(report.problems)
        if expected is not None and report.beyond_head > 1:
            # The daemon fsyncs a record before it rewrites the head, so a
            # crash leaves the head one record behind, never more. Adopting
            # more would let anyone who can write the file extend the chain.
            problems.append(
                f"{path} has {report.last_seq + 1} records but its head file {head_file} "
                f"says {expected[0] + 1}: {report.beyond_head} records beyond the head, more "
                "than the one a crash can leave; they were appended by something other than "
                "agentd, or the head file was replaced by an older one"
            )
    if not problems:
        return report.last_seq, report.head, None
    aside = _move_aside(path, now) if path.exists() else None
    if head_file.exists():
        base = aside if aside is not None else _free_name(path, now)
        head_file.rename(auditchain.head_path(base))
    return -1, auditchain.GENESIS, {
        "broken_log": str(aside) if aside else None,
        "broken_head": report.head,
        "broken_last_seq": report.last_seq,
        "broken_records": report.records,
        "expected_head": list(expected) if expected else None,
        "problems": problems[:_MAX_PROBLEMS_RECORDED],
        "problems_total": len(problems),
    }


def _free_name(path: Path, now: int) -> Path:
    for n in range(1000):
        aside = path.with_name(f"{path.name}.broken-{now}" + (f"-{n}" if n else ""))
        if not aside.exists() and not auditchain.head_path(aside).exists():
            return aside
    raise FileExistsError(f"no free name to move {path} aside")


def _move_aside(path: Path, now: int) -> Path:
    """Rename *path* to ``PATH.broken-<now>[-N]`` without clobbering anything."""
    for n in range(1000):
        aside = path.with_name(f"{path.name}.broken-{now}" + (f"-{n}" if n else ""))
        if auditchain.head_path(aside).exists():
            continue
        try:
            # link() fails if the target exists, unlike rename().
            os.link(path, aside)
        except FileExistsError:
            continue
        path.unlink()
        return aside
    raise FileExistsError(f"no free name to move {path} aside")


__all__ = ["AuditLog", "AuditWriteError"]
