"""The audit log's record format and its verifier, shared by agentd and agentctl.

The log is a hash chain of JSON lines. Each record is one line of canonical
JSON (sorted keys, no spaces, ASCII only) with these fields:

- ``seq``: 0 for the first record, then consecutive;
- ``ts``: UTC time of the append, ISO-8601 with microseconds and ``Z``;
- ``prev``: sha256 (hex) of the previous record's line bytes, without the
  newline; :data:`GENESIS` for seq 0;
- ``event``: what happened, e.g. ``"kill"``;

plus any free fields of the event. Editing, deleting or reordering a record
breaks the chain at that point. Removing whole records from the end leaves a
valid, shorter chain: only a head kept elsewhere (the daemon's ``PATH.head``
file, or the head its Info RPC reports) can reveal that. The chain is
tamper-*evident*, not tamper-proof: whoever can rewrite the whole file and the
head can forge a consistent history.

This module must not import ``daemon``: agentctl verifies logs without it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

GENESIS = "0" * 64
"""The ``prev`` of record 0."""

RESERVED_FIELDS = frozenset({"seq", "ts", "prev", "event"})
"""Field names the chain owns; free fields may not use them."""

MAX_LINE = 1 << 20
"""Longest record line, in bytes. Bounds the verifier's memory per line."""

HEAD_SUFFIX = ".head"

# How many recent (seq -> hash) entries the verifier keeps to check the links
# of records that arrive out of order. Reordering further apart than this is
# still reported as out of order; only the link check is skipped.
_LINK_WINDOW = 4096

# Reused: building an encoder per call costs more than encoding a record.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)
_DECODER = json.JSONDecoder()
_TS_RE = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
_HEX64_RE = re.compile(r"\A[0-9a-f]{64}\Z")


# ------------------------------------------------------------------ encoding
def canonical_json(obj: object) -> bytes:
    """Encode *obj* as canonical JSON bytes.

    Raises TypeError for values JSON cannot represent (bytes, sets, objects)
    and ValueError for NaN or infinities, which are not JSON.
    """
    return _ENCODER.encode(obj).encode("ascii")


def format_ts(when: datetime) -> str:
    """Format an aware datetime as the chain's ``ts``: UTC, microseconds, ``Z``.

    Raises ValueError for a naive datetime: its zone would be a guess.
    """
    if when.tzinfo is None:
        raise ValueError("audit timestamps need an aware datetime")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_record(
    *,
    seq: int,
    prev: str,
    event: str,
    ts: datetime,
    fields: Mapping[str, Any] | None = None,
) -> bytes:
    """Return one record's line, canonical JSON *without* the trailing newline.

    The line's bytes are what :func:`record_hash` hashes. Raises ValueError if
    a free field uses a reserved name, the line would exceed :data:`MAX_LINE`,
    or a value is NaN; TypeError if a value is not JSON-serialisable (convert
    bytes to hex at the call site).
    """
    free = dict(fields or {})
    clash = RESERVED_FIELDS.intersection(free)
    if clash:
        raise ValueError(f"audit field names reserved by the chain: {sorted(clash)}")
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    if not _HEX64_RE.match(prev):
        raise ValueError(f"prev must be 64 lowercase hex digits, got {prev!r}")
    line = canonical_json({**free, "seq": seq, "ts": format_ts(ts), "prev": prev, "event": event})
    if len(line) > MAX_LINE:
        raise ValueError(f"audit record of {len(line)} bytes exceeds {MAX_LINE}")
    return line


def record_hash(line: bytes) -> str:
    """Return the sha256 hex digest of a record line (newline excluded)."""
    return hashlib.sha256(line.removesuffix(b"\n")).hexdigest()


# ----------------------------------------------------------------- head file
def head_path(log_path: Path) -> Path:
    """Return where the head of the log at *log_path* is kept: ``PATH.head``."""
    return log_path.with_name(log_path.name + HEAD_SUFFIX)


def encode_head(seq: int, sha256: str) -> bytes:
    """Return the head file's contents for the record *seq* with hash *sha256*."""
    return canonical_json({"seq": seq, "sha256": sha256, "records": seq + 1}) + b"\n"


def read_head(path: Path) -> tuple[int, str]:
    """Read a head file and return ``(seq, sha256)`` of the newest record.

    An empty log's head is ``(-1, GENESIS)``. Raises OSError if the file cannot
    be read and ValueError if it is not a head file.
    """
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a head file: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a head file: expected a JSON object")
    seq, sha = obj.get("seq"), obj.get("sha256")
    if not _is_int(seq) or seq < -1 or not isinstance(sha, str) or not _HEX64_RE.match(sha):
        raise ValueError(f"{path}: not a head file: needs an integer 'seq' and a hex 'sha256'")
    return seq, sha


# ------------------------------------------------------------------ verifying
@dataclass
class VerifyReport:
    """What :func:`verify` found.

    ``records`` counts the record lines read; ``last_seq`` and ``head`` are the
    seq and hash of the newest record (``-1`` and :data:`GENESIS` for an empty
    log). ``beyond_head`` counts records newer than the expected head: the
    daemon appends before it updates its head, so a head read a moment
    earlier may lag; those records are chained but not anchored by the head.
    """

    ok: bool
    records: int
    head: str
    last_seq: int
    problems: list[str] = field(default_factory=list)
    beyond_head: int = 0


def verify(path: Path, *, expected_head: tuple[int, str] | None) -> VerifyReport:
    """Verify the audit log at *path*, streaming it line by line.

    Detects any edited, deleted, duplicated or reordered record and a partial
    last line. Removal of whole trailing records is detected only against
    *expected_head* ``(seq, sha256)`` of the newest record the caller trusts.
    Every problem names the line and, when known, the seq. Raises OSError if
    the file cannot be opened or read; everything wrong *inside* it is
    reported, never raised.
    """
    with path.open("rb") as f:
        return _Verifier(expected_head).run(f)


@dataclass
class _Gap:
    """A run of seqs ``first..last`` not seen (yet) where the chain jumped."""

    first: int
    last: int
    line: int


class _Verifier:
    """One pass over a log. Links are checked by seq, so order is checked apart."""

    def __init__(self, expected_head: tuple[int, str] | None) -> None:
        self.expected = expected_head
        self.problems: list[str] = []
        self.records = 0
        self.last_seq = -1
        self.head = GENESIS
        # seq -> (hash, line number) of recent records.
        self.seen: dict[int, tuple[str, int]] = {}
        # seq -> (the 'prev' claimed for it, line, seq of the claimer): links
        # to records not seen yet (reordered, or deleted).
        self.pending: dict[int, tuple[str, int, int]] = {}
        self.gaps: list[_Gap] = []
        # (hash, line) of the record at the expected head's seq.
        self.at_head: tuple[str, int] | None = None

    def run(self, f: BinaryIO) -> VerifyReport:
        lineno = 0
        while raw := f.readline(MAX_LINE + 1):
            lineno += 1
            if raw.endswith(b"\n"):
                self._record(lineno, raw[:-1])
            elif len(raw) > MAX_LINE:
                self.problems.append(f"line {lineno}: longer than {MAX_LINE} bytes")
                _skip_rest_of_line(f)
            else:
                self.problems.append(f"line {lineno}: file ends in a partial line: truncated")
        self._finish()
        return VerifyReport(
            ok=not self.problems,
            records=self.records,
            head=self.head,
            last_seq=self.last_seq,
            problems=self.problems,
            beyond_head=max(0, self.last_seq - self.expected[0]) if self.expected else 0,
        )

    def _record(self, lineno: int, line: bytes) -> None:
        parsed = self._parse(lineno, line)
        if parsed is None:
            return
        seq, prev = parsed
        where = f"line {lineno} (seq {seq})"
        self.records += 1
        digest = record_hash(line)

        if seq in self.seen:
            self.problems.append(
                f"{where}: duplicate seq (first at line {self.seen[seq][1]}): "
                "a record was copied"
            )
            return
        if seq <= self.last_seq:
            self.problems.append(
                f"{where}: records out of order: seq {seq} comes after seq {self.last_seq}"
            )
            self._fill_gap(seq)
        elif seq > self.last_seq + 1:
            self.gaps.append(_Gap(self.last_seq + 1, seq - 1, lineno))

        if self.expected is not None and seq == self.expected[0]:
            self.at_head = (digest, lineno)
        self._check_link(where, seq, prev, lineno)
        self._check_claim_on(seq, digest, lineno)
        self.seen[seq] = (digest, lineno)
        if seq > self.last_seq:
            self.last_seq, self.head = seq, digest
            if len(self.seen) > 2 * _LINK_WINDOW:
                floor = seq - _LINK_WINDOW
                self.seen = {s: v for s, v in self.seen.items() if s >= floor}

    def _parse(self, lineno: int, line: bytes) -> tuple[int, str] | None:
        """Return (seq, prev) of a record, reporting what is malformed in it.

        Returns None if the line has no usable seq; prev is "" if unusable.
        """
        try:
            obj = _DECODER.decode(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.problems.append(f"line {lineno}: not a JSON record")
            return None
        if not isinstance(obj, dict):
            self.problems.append(f"line {lineno}: not a JSON object")
            return None
        seq, prev, ts, event = obj.get("seq"), obj.get("prev"), obj.get("ts"), obj.get("event")
        if not _is_int(seq) or seq < 0:
            self.problems.append(f"line {lineno}: 'seq' is missing or not a non-negative integer")
            return None
        bad: list[str] = []
        if not isinstance(prev, str) or not _HEX64_RE.match(prev):
            bad.append("'prev' is not a sha256 hex digest")
            prev = ""
        if not isinstance(ts, str) or not _valid_ts(ts):
            bad.append("'ts' is not a UTC ISO-8601 time with microseconds")
        if not isinstance(event, str):
            bad.append("'event' is missing or not a string")
        if not _is_canonical(obj, line):
            # The daemon only ever writes canonical lines.
            bad.append("not in canonical form: written by something other than agentd")
        self.problems.extend(f"line {lineno} (seq {seq}): {b}" for b in bad)
        return seq, prev

    def _check_link(self, where: str, seq: int, prev: str, lineno: int) -> None:
        """Check this record's 'prev' against the record it names."""
        if not prev:
            return
        if seq == 0:
            if prev != GENESIS:
                self.problems.append(f"{where}: 'prev' of seq 0 is not the genesis hash")
            return
        before = self.seen.get(seq - 1)
        if before is None:
            # Not seen yet: reordered (checked when it arrives) or deleted
            # (reported as a gap).
            self.pending[seq - 1] = (prev, lineno, seq)
        elif before[0] != prev:
            self.problems.append(self._broken_link(seq - 1, before, seq, lineno))

    def _check_claim_on(self, seq: int, digest: str, lineno: int) -> None:
        """Check the 'prev' that an earlier line claimed for this record."""
        claim = self.pending.pop(seq, None)
        if claim is not None and claim[0] != digest:
            self.problems.append(self._broken_link(seq, (digest, lineno), claim[2], claim[1]))

    def _broken_link(
        self, seq: int, record: tuple[str, int], next_seq: int, next_line: int
    ) -> str:
        """Describe a 'prev' of *next_seq* that does not match the hash of *seq*.

        Either record was altered; blame *seq* unless the head vouches for it.
        """
        if self.expected == (seq, record[0]):
            return (
                f"line {next_line} (seq {next_seq}): 'prev' does not match the hash of "
                f"seq {seq}: record forged or edited"
            )
        return (
            f"line {record[1]} (seq {seq}): record was edited: "
            f"its hash does not match 'prev' of seq {next_seq}"
        )

    def _fill_gap(self, seq: int) -> None:
        for i, gap in enumerate(self.gaps):
            if gap.first <= seq <= gap.last:
                pieces = [_Gap(gap.first, seq - 1, gap.line), _Gap(seq + 1, gap.last, gap.line)]
                self.gaps[i : i + 1] = [g for g in pieces if g.first <= g.last]
                return

    def _finish(self) -> None:
        for gap in self.gaps:
            n = gap.last - gap.first + 1
            what = "a record was deleted" if n == 1 else f"{n} records were deleted"
            if gap.first == 0:
                jump = f"log starts at seq {gap.last + 1}, not 0"
            else:
                jump = f"seq jumps from {gap.first - 1} to {gap.last + 1}"
            self.problems.append(f"line {gap.line}: {jump}: {what}")
        if self.expected is None:
            return
        head_seq, head_hash = self.expected
        if self.last_seq < head_seq:
            self.problems.append(
                f"log has {self.last_seq + 1} records but the daemon's head says "
                f"{head_seq + 1}: truncated"
            )
        elif self.at_head is not None and self.at_head[0] != head_hash:
            if head_seq == self.last_seq:
                self.problems.append("last record hash differs from the daemon's head")
            else:
                self.problems.append(
                    f"line {self.at_head[1]} (seq {head_seq}): record hash differs "
                    "from the daemon's head"
                )


def _skip_rest_of_line(f: BinaryIO) -> None:
    while True:
        chunk = f.readline(MAX_LINE)
        if not chunk or chunk.endswith(b"\n"):
            return


def _is_canonical(obj: object, line: bytes) -> bool:
    try:
        return canonical_json(obj) == line
    except ValueError:  # NaN or infinity: json.loads accepts them
        return False


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass; `"seq": true` is not a seq.
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_ts(ts: str) -> bool:
    if not _TS_RE.match(ts):
        return False
    try:
        datetime.fromisoformat(ts[:-1])  # a real date: no month 13 (and 30x faster than strptime)
    except ValueError:
        return False
    return True
