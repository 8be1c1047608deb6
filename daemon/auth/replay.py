"""The persisted replay cache: each accepted command is accepted once.

A command stays replayable by signature until expires_at plus the clock skew,
so its id and payload hash are kept at least that long, in memory and in an
append-only file that survives a restart.

File format (mode 0600): a header line `{"agentd_replay": 1}`, then one JSON
object a line, `{"id": HEX, "sha256": HEX, "exp": UNIX_SECONDS}`.

If the file is lost or corrupt at start-up, any command accepted before could
be replayed. Following RFC 4120 §3.2.3 (a Kerberos server that loses its
replay cache refuses authenticators until the longest lifetime has passed),
the cache is then *degraded*: only stop, kill and estop are accepted until now +
window_s. A replayed stop or kill can only end an agent, never start one.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import durable
from daemon.auth._text import iso_utc
from daemon.auth.policy import STOP_ACTIONS
from daemon.errors import ReplayCacheDegraded, ReplayCacheIOError, Replayed

_HEADER = b'{"agentd_replay": 1}'
_ID_BYTES = 16
_SHA256_BYTES = 32
_FILE_MODE = 0o600


@dataclass(frozen=True)
class _Entry:
    command_id: bytes
    payload_sha256: bytes
    expires_at: float

    def line(self) -> bytes:
        record = {
            "id": self.command_id.hex(),
            "sha256": self.payload_sha256.hex(),
            "exp": self.expires_at,
        }
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class _Corrupt(Exception):
    """The file does not parse; the message says where."""


class ReplayCache:
    """Command ids and payload hashes already accepted. Thread-safe.

    Build one with ReplayCache.open().
    """

    def __init__(
        self,
        path: Path,
        *,
        window_s: float,
        entries: list[_Entry],
        degraded_until: float | None,
        degraded_why: str,
    ) -> None:
        """Use ReplayCache.open(); this constructor does no I/O."""
        self.path = path
        # Entries are kept until expires_at + window_s. verify() accepts a
        # command until expires_at + skew, and window_s = max lifetime + skew
        # >= skew, so this outlives every chance of a replay (by at most one
        # lifetime, a few hundred small entries).
        self._retain_s = window_s
        self._lock = threading.Lock()  # guards the dicts and _pending: no I/O under it
        self._io_lock = threading.Lock()  # serialises appends and rewrites of the file
        self._ids: dict[bytes, float] = {}
        self._hashes: dict[bytes, float] = {}
        # Every entry kept, written or pending, oldest first: what prune() rewrites.
        self._entries: list[_Entry] = list(entries)
        self._pending: list[_Entry] = []
        self._degraded_until = degraded_until
        self._degraded_why = degraded_why
        for entry in entries:
            self._ids[entry.command_id] = entry.expires_at
            self._hashes[entry.payload_sha256] = entry.expires_at

    @classmethod
    def open(cls, path: Path, *, now: float, window_s: float, fresh: bool) -> ReplayCache:
        """Load the cache file at `path`, or start one.

        `window_s` is the longest command lifetime plus the clock skew.
        `fresh` says the state directory is brand new, so a missing file lost
        nothing. A readable file is loaded, expired entries dropped and the
        file compacted. A missing file (fresh=False) or a corrupt one (kept
        aside as PATH.corrupt-<unix>) leaves the cache degraded until
        now + window_s.

        Raises ReplayCacheIOError when the file exists but cannot be read, or
        the new file cannot be written.
        """
        entries: list[_Entry] = []
        degraded_until: float | None = None
        why = ""
        try:
            data: bytes | None = path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as err:
            raise ReplayCacheIOError(
                f"replay cache {path} cannot be read: {err.strerror}; fix its permissions "
                "or move it aside and restart agentd"
            ) from err
        if data is None:
            if not fresh:
                degraded_until, why = now + window_s, "was missing"
        else:
            try:
                entries = _parse(data)
            except _Corrupt as err:
                aside = _set_aside(path, now)
                degraded_until = now + window_s
                why = f"was corrupt ({err}; kept as {aside})"
        live = [e for e in entries if e.expires_at + window_s >= now]
        _write_atomically(path, live)
        return cls(
            path,
            window_s=window_s,
            entries=live,
            degraded_until=degraded_until,
            degraded_why=why,
        )

    @property
    def degraded_until(self) -> float | None:
        """Unix time until which only stop, kill and estop are accepted, or None.

        Cleared by the first check_and_reserve() or prune() at or after that
        time, so it may briefly name a time in the past.
        """
        with self._lock:
            return self._degraded_until

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def check_and_reserve(
        self,
        *,
        command_id: bytes,
        payload_sha256: bytes,
        expires_at: float,
        action: str,
        now: float,
    ) -> None:
        """Record a command as accepted, in memory only; persist() writes it.

        This sits on the kill path: no I/O, and the lock is held only for the
        dictionary operations.

        Raises ReplayCacheDegraded when the cache is degraded and `action` is
        not a stop or kill; Replayed when the command id or the payload hash
        was accepted before.
        """
        with self._lock:
            until = self._degraded_until
            if until is not None and now >= until:
                until = self._degraded_until = None
            refuse_degraded = until is not None and action not in STOP_ACTIONS
            replayed = command_id in self._ids or payload_sha256 in self._hashes
            if not refuse_degraded and not replayed:
                self._ids[command_id] = expires_at
                self._hashes[payload_sha256] = expires_at
                entry = _Entry(command_id, payload_sha256, expires_at)
                self._entries.append(entry)
                self._pending.append(entry)
        if refuse_degraded:
            assert until is not None
            raise ReplayCacheDegraded(
                f"the replay cache {self.path} {self._degraded_why} at start-up, so an old "
                f"command could be replayed; until {iso_utc(until)} (the longest command "
                f"lifetime plus clock skew) only stop, kill and estop are accepted, so this "
                f"{action} is refused; retry it then"
            )
        if replayed:
            raise Replayed(
                f"command {command_id.hex()} was already accepted; replays are refused — "
                "sign a new command"
            )

    def persist(self) -> None:
        """Append every reserved but unwritten entry to the file and fsync it.

        Call after a kill (nothing slow before the kill) and before acting on
        a run. Raises ReplayCacheIOError when the write fails; the entries
        stay queued for the next persist(), and the file is cut back to its
        old length so a torn line does not corrupt it.
        """
        with self._io_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                # No O_CREAT there: a file that vanished must not come back
                # without its header and earlier entries; a torn line is cut back.
                durable.append(self.path, b"".join(e.line() for e in batch))
            except OSError as err:
                with self._lock:
                    self._pending = batch + self._pending
                raise ReplayCacheIOError(
                    f"replay cache {self.path} cannot be written: {err.strerror}; runs are "
                    "refused until it can (a restart would forget these commands)"
                ) from err

    def prune(self, now: float) -> int:
        """Forget entries that can no longer be replayed (past expires_at + window).

        Rewrites the file without them (tmp, fsync, rename), so it stays as
        small as the last window's commands on a daemon that runs for months.
        Does nothing to the file when nothing expired. Call it rarely, and
        off the kill path: a kill's persist() waits for the rewrite (its
        check_and_reserve() does not). Returns how many entries were dropped.

        Raises ReplayCacheIOError when the file cannot be rewritten; the old
        file stays, and no entry is lost.
        """
        with self._io_lock:
            with self._lock:
                if self._degraded_until is not None and now >= self._degraded_until:
                    self._degraded_until = None
                horizon = now - self._retain_s
                keep = [e for e in self._entries if e.expires_at >= horizon]
                dropped = len(self._entries) - len(keep)
                if not dropped:
                    return 0
                self._entries = keep
                self._ids = {e.command_id: e.expires_at for e in keep}
                self._hashes = {e.payload_sha256: e.expires_at for e in keep}
                # The rewrite holds the pending entries too.
                batch, self._pending = self._pending, []
            try:
                _write_atomically(self.path, keep)
            except ReplayCacheIOError:
                with self._lock:
                    self._pending = batch + self._pending
                raise
        return dropped


def _parse(data: bytes) -> list[_Entry]:
    """Parse the whole file. Raises _Corrupt naming the first bad line."""
    if not data:
        raise _Corrupt("empty file")
    if not data.endswith(b"\n"):
        # A crash in the middle of an append: that entry is lost.
        raise _Corrupt("torn last line")
    lines = data[:-1].split(b"\n")
    if lines[0] != _HEADER:
        raise _Corrupt("line 1 is not the header " + _HEADER.decode())
    return [_entry(_json(line, n), n) for n, line in enumerate(lines[1:], start=2)]


def _json(line: bytes, number: int) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as err:
        raise _Corrupt(f"line {number} is not JSON") from err


def _entry(obj: Any, number: int) -> _Entry:
    if not isinstance(obj, dict) or set(obj) != {"id", "sha256", "exp"}:
        raise _Corrupt(f"line {number} is not an entry")
    command_id = _hex(obj["id"], _ID_BYTES, number)
    digest = _hex(obj["sha256"], _SHA256_BYTES, number)
    exp = obj["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise _Corrupt(f"line {number} has a bad exp")
    return _Entry(command_id, digest, float(exp))


def _hex(value: Any, size: int, number: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise _Corrupt(f"line {number} has a bad hex field")
    return raw


def _set_aside(path: Path, now: float) -> Path:
    """Rename a corrupt file to PATH.corrupt-<unix> (never over an earlier one)."""
    aside = path.with_name(f"{path.name}.corrupt-{int(now)}")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{int(now)}.{n}")
    try:
        durable.rename(path, aside)
    except OSError as err:
        raise ReplayCacheIOError(
            f"replay cache {path} is corrupt and cannot be moved aside: {err.strerror}"
        ) from err
    return aside


def _write_atomically(path: Path, entries: list[_Entry]) -> None:
    """Replace `path` with a file holding `entries` (durable.replace). Raises ReplayCacheIOError."""
    body = _HEADER + b"\n" + b"".join(e.line() for e in entries)
    try:
        durable.replace(path, body, mode=_FILE_MODE)
    except OSError as err:
        raise ReplayCacheIOError(
            f"replay cache {path} cannot be written: {err.strerror}; check the state "
            "directory's permissions and free space"
        ) from err
