"""The audit log: the chain the daemon writes and the verifier agentctl runs.

No root needed. Each tampering test edits a real log file the way an
intruder with a text editor would, then checks the verifier names the line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from agentd import auditchain
from agentd.auditchain import GENESIS, head_path, read_head, verify

from daemon.audit import AuditLog, AuditWriteError

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def _clock() -> Callable[[], datetime]:
    """A clock that ticks one millisecond per call: deterministic timestamps."""
    ticks = iter(range(10**9))
    return lambda: T0 + timedelta(milliseconds=next(ticks))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.log"


@pytest.fixture
def log(log_path: Path) -> Iterator[AuditLog]:
    with AuditLog.open(log_path, clock=_clock()) as opened:
        yield opened


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("kill", name=f"agent-{i}", processes_killed=i, duration_ms=1.5)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _with_head(path: Path) -> auditchain.VerifyReport:
    return verify(path, expected_head=read_head(head_path(path)))


# ------------------------------------------------------------------- format
def test_records_are_canonical_json_lines_chained_from_genesis(
    log: AuditLog, log_path: Path
) -> None:
    assert log.append("daemon_start", version="0.1.0") is True  # durable
    assert log.append("kill", name="rogue", command_id="00ff") is True

    lines = _lines(log_path)
    first, second = (auditchain.record_hash(line) for line in lines)
    assert lines[0] == (
        b'{"event":"daemon_start","prev":"' + GENESIS.encode() + b'",'
        b'"seq":0,"ts":"2025-03-01T12:00:00.001000Z","version":"0.1.0"}\n'
    )
    assert first == hashlib.sha256(lines[0][:-1]).hexdigest()
    rec = json.loads(lines[1])
    assert rec["prev"] == first
    assert rec["seq"] == 1
    assert second == auditchain.record_hash(lines[1])
    assert log.head == (1, second)
    assert log.records == 2


def test_append_and_verify_ok(log: AuditLog, log_path: Path) -> None:
    _fill(log, 10)

    report = _with_head(log_path)

    assert report.ok, report.problems
    assert (report.records, report.last_seq, report.head) == (10, 9, log.head[1])
    assert json.loads(head_path(log_path).read_text()) == {
        "seq": 9, "sha256": log.head[1], "records": 10,
    }


def test_file_modes(log: AuditLog, log_path: Path) -> None:
    log.append("x")

    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(head_path(log_path).stat().st_mode) == 0o600
    # The umask may only tighten 0750.
    assert stat.S_IMODE(log_path.parent.stat().st_mode) & ~0o750 == 0


def test_empty_log_verifies(log_path: Path) -> None:
    log_path.parent.mkdir()
    log_path.touch()

    report = verify(log_path, expected_head=None)

    assert (report.ok, report.records, report.head, report.last_seq) == (True, 0, GENESIS, -1)


def test_bytes_and_reserved_fields_are_refused_before_writing(
    log: AuditLog, log_path: Path
) -> None:
    log.append("x")
    before = log_path.read_bytes()

    with pytest.raises(TypeError):
        log.append("kill", command_id=b"\x00\x01")
    with pytest.raises(ValueError, match="reserved"):
        log.append("kill", seq=7)
    with pytest.raises(ValueError):
        log.append("kill", duration_ms=float("nan"))

    assert log_path.read_bytes() == before
    assert log.records == 1


def test_append_after_close_raises_audit_write_error(log_path: Path) -> None:
    log = AuditLog.open(log_path)
    log.close()

    with pytest.raises(AuditWriteError, match="cannot write audit log"):
        log.append("x")


# ---------------------------------------------------------------- tampering
def test_detects_an_edited_field(log: AuditLog, log_path: Path) -> None:
    _fill(log, 10)
    lines = _lines(log_path)
    lines[6] = lines[6].replace(b'"processes_killed":6', b'"processes_killed":0')
    _write_lines(log_path, lines)

    report = verify(log_path, expected_head=None)

    assert not report.ok
    assert report.problems == [
        "line 7 (seq 6): record was edited: its hash does not match 'prev' of seq 7"
    ]


def test_detects_an_edited_last_record_only_against_the_head(
    log: AuditLog, log_path: Path
) -> None:
    _fill(log, 5)
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace(b"agent-4", b"agent-X")
    _write_lines(log_path, lines)

    # Nothing follows the last record to vouch for it...
    assert verify(log_path, expected_head=None).ok
    # ...but the daemon's head does.
    assert _with_head(log_path).problems == ["last record hash differs from the daemon's head"]


def test_detects_a_deleted_middle_record(log: AuditLog, log_path: Path) -> None:
    _fill(log, 10)
    lines = _lines(log_path)
    del lines[5]
    _write_lines(log_path, lines)

    report = verify(log_path, expected_head=None)

    assert report.problems == ["line 6: seq jumps from 4 to 6: a record was deleted"]


def test_detects_several_deleted_records(log: AuditLog, log_path: Path) -> None:
    _fill(log, 10)
    lines = _lines(log_path)
    del lines[2:5]
    _write_lines(log_path, lines)

    assert verify(log_path, expected_head=None).problems == [
        "line 3: seq jumps from 1 to 5: 3 records were deleted"
    ]


def test_detects_a_deleted_first_record(log: AuditLog, log_path: Path) -> None:
    _fill(log, 3)
    _write_lines(log_path, _lines(log_path)[1:])

    assert verify(log_path, expected_head=None).problems == [
        "line 1: log starts at seq 1, not 0: a record was deleted"
    ]


def test_detects_two_records_swapped(log: AuditLog, log_path: Path) -> None:
    _fill(log, 10)
    lines = _lines(log_path)
    lines[5], lines[6] = lines[6], lines[5]
    _write_lines(log_path, lines)

    report = verify(log_path, expected_head=None)

    assert report.problems == [
        "line 7 (seq 5): records out of order: seq 5 comes after seq 6"
    ]


def test_detects_a_duplicated_record(log: AuditLog, log_path: Path) -> None:
    _fill(log, 5)
    lines = _lines(log_path)
    lines.insert(3, lines[2])
    _write_lines(log_path, lines)

    assert verify(log_path, expected_head=None).problems == [
        "line 4 (seq 2): duplicate seq (first at line 3): a record was copied"
    ]


def test_detects_a_truncated_last_line(log: AuditLog, log_path: Path) -> None:
    _fill(log, 5)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-20])

    report = verify(log_path, expected_head=None)

    assert report.problems == ["line 5: file ends in a partial line: truncated"]
    assert report.records == 4


def test_detects_trailing_records_removed_against_the_head_file(
    log: AuditLog, log_path: Path
) -> None:
    _fill(log, 15)
    _write_lines(log_path, _lines(log_path)[:12])

    # A shorter chain is still a valid chain: only the head can tell.
    assert verify(log_path, expected_head=None).ok
    assert _with_head(log_path).problems == [
        "log has 12 records but the daemon's head says 15: truncated"
    ]


def test_detects_a_record_appended_by_hand_with_a_bad_prev(
    log: AuditLog, log_path: Path
) -> None:
    _fill(log, 5)
    forged = auditchain.encode_record(
        seq=5, prev="ab" * 32, event="kill", ts=T0, fields={"name": "innocent"}
    )
    with log_path.open("ab") as f:
        f.write(forged + b"\n")

    # Without a head, either record could be the altered one.
    assert verify(log_path, expected_head=None).problems == [
        "line 5 (seq 4): record was edited: its hash does not match 'prev' of seq 5"
    ]
    # The head vouches for seq 4, so the forged record is to blame.
    assert _with_head(log_path).problems == [
        "line 6 (seq 5): 'prev' does not match the hash of seq 4: record forged or edited"
    ]


def test_a_record_forged_with_the_right_prev_is_beyond_the_head(
    log: AuditLog, log_path: Path
) -> None:
    """The limit of a hash chain: whoever can write the file can extend it."""
    _fill(log, 3)
    forged = auditchain.encode_record(seq=3, prev=log.head[1], event="kill", ts=T0)
    with log_path.open("ab") as f:
        f.write(forged + b"\n")

    report = _with_head(log_path)

    assert report.ok
    assert report.beyond_head == 1


def test_detects_lines_not_written_by_the_daemon(log: AuditLog, log_path: Path) -> None:
    _fill(log, 3)
    lines = _lines(log_path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None).encode() + b"\n"  # spaces
    lines.insert(2, b"rm -rf /\n")
    _write_lines(log_path, lines)

    problems = verify(log_path, expected_head=None).problems

    assert problems == [
        "line 2 (seq 1): not in canonical form: written by something other than agentd",
        "line 3: not a JSON record",
        # Re-encoding changed its bytes, so its hash no longer matches seq 2's 'prev'.
        "line 2 (seq 1): record was edited: its hash does not match 'prev' of seq 2",
    ]


def test_head_file_round_trip(tmp_path: Path) -> None:
    head = tmp_path / "x.head"
    head.write_bytes(auditchain.encode_head(4, "ab" * 32))
    assert read_head(head) == (4, "ab" * 32)

    head.write_text("not json")
    with pytest.raises(ValueError, match="not a head file"):
        read_head(head)


# ------------------------------------------------------------------ restart
def test_restart_continues_the_chain(log_path: Path) -> None:
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 3)
        head = log.head

    with AuditLog.open(log_path, clock=_clock()) as log:
        assert log.head == head
        log.append("daemon_start")
        assert log.head[0] == 3

    assert [json.loads(line)["seq"] for line in _lines(log_path)] == [0, 1, 2, 3]
    assert _with_head(log_path).ok


def test_restart_with_a_lagging_head_catches_up(log_path: Path) -> None:
    """A crash between the fsync of a record and the head update leaves a lagging head."""
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 3)
        lagging = auditchain.encode_head(1, auditchain.record_hash(_lines(log_path)[1]))
        head = log.head
    head_path(log_path).write_bytes(lagging)

    with AuditLog.open(log_path, clock=_clock()) as log:
        assert log.head == head

    assert read_head(head_path(log_path)) == head
    assert not list(log_path.parent.glob("*.broken-*"))


def test_a_head_lagging_by_more_than_one_record_is_refused(log_path: Path) -> None:
    """Only a crash between one append and its head update may leave records beyond the head."""
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 2)
        stale = log.head  # seq 1: two records
        _fill(log, 2)  # two more: the head will lag by two
    head_path(log_path).write_bytes(auditchain.encode_head(*stale))

    with AuditLog.open(log_path, clock=_clock()) as log:
        assert log.head[0] == 0  # not adopted: a new chain

    aside = log_path.with_name(f"audit.log.broken-{int(T0.timestamp())}")
    first = json.loads(_lines(log_path)[0])
    assert first["event"] == "audit_chain_broken"
    assert first["broken_log"] == str(aside)
    assert first["problems"] == [
        f"{log_path} has 4 records but its head file {head_path(log_path)} says 2: 2 records "
        "beyond the head, more than the one a crash can leave; they were appended by "
        "something other than agentd, or the head file was replaced by an older one"
    ]
    assert len(_lines(aside)) == 4


def test_a_broken_log_is_moved_aside_and_the_new_chain_says_so(log_path: Path) -> None:
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 10)
        old_head = log.head
    lines = _lines(log_path)
    del lines[4]
    _write_lines(log_path, lines)

    with AuditLog.open(log_path, clock=_clock()) as log:
        assert log.head[0] == 0

    stamp = int(T0.timestamp())
    aside = log_path.with_name(f"audit.log.broken-{stamp}")
    assert aside.read_bytes() == b"".join(lines)
    assert read_head(head_path(aside)) == old_head
    first = json.loads(_lines(log_path)[0])
    assert first["event"] == "audit_chain_broken"
    assert first["prev"] == GENESIS
    assert first["broken_log"] == str(aside)
    assert first["broken_records"] == 9
    assert first["problems"] == ["line 5: seq jumps from 3 to 5: a record was deleted"]
    assert first["problems_total"] == 1
    assert _with_head(log_path).ok
    # The evidence still verifies as broken, against its own head.
    assert not _with_head(aside).ok


def test_a_partial_last_line_at_open_is_moved_aside(log_path: Path) -> None:
    """A crash mid-write, or a truncation: never append after half a line."""
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 3)
    log_path.write_bytes(log_path.read_bytes()[:-5])

    with AuditLog.open(log_path, clock=_clock()) as log:
        log.append("daemon_start")

    assert _with_head(log_path).ok
    first = json.loads(_lines(log_path)[0])
    assert first["problems"] == [
        "line 3: file ends in a partial line: truncated",
        "log has 2 records but the daemon's head says 3: truncated",
    ]


def test_trailing_truncation_is_caught_at_open(log_path: Path) -> None:
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 5)
    _write_lines(log_path, _lines(log_path)[:3])

    AuditLog.open(log_path, clock=_clock()).close()

    first = json.loads(_lines(log_path)[0])
    assert first["problems"] == ["log has 3 records but the daemon's head says 5: truncated"]


def test_a_deleted_log_whose_head_remains_is_recorded(log_path: Path) -> None:
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 5)
    log_path.unlink()

    AuditLog.open(log_path, clock=_clock()).close()

    first = json.loads(_lines(log_path)[0])
    assert first["event"] == "audit_chain_broken"
    assert first["broken_log"] is None
    assert first["problems"] == ["log is missing but its head says 5 records: deleted"]
    assert _with_head(log_path).ok


def test_an_unreadable_log_is_set_aside_not_fatal(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on the old log must not keep the daemon (the kill switch) from starting."""
    with AuditLog.open(log_path, clock=_clock()) as log:
        _fill(log, 2)

    def eio(path: Path, *, expected_head: tuple[int, str] | None) -> auditchain.VerifyReport:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(auditchain, "verify", eio)  # the only way to get EIO without a bad disk
    AuditLog.open(log_path, clock=_clock()).close()
    monkeypatch.undo()

    first = json.loads(_lines(log_path)[0])
    assert first["event"] == "audit_chain_broken"
    assert first["problems"] == ["cannot read the log: [Errno 5] Input/output error"]
    assert _with_head(log_path).ok


def test_open_reports_what_it_could_not_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(AuditWriteError, match="cannot open audit log"):
        AuditLog.open(tmp_path / "file" / "audit.log")


def test_two_breaks_in_the_same_second_do_not_clobber_each_other(log_path: Path) -> None:
    for _ in range(2):
        with AuditLog.open(log_path, clock=_clock()) as log:
            _fill(log, 2)
        log_path.write_bytes(log_path.read_bytes()[:-1])

    AuditLog.open(log_path, clock=_clock()).close()

    names = sorted(p.name for p in log_path.parent.glob("audit.log.broken-*"))
    stamp = int(T0.timestamp())
    assert names == [
        f"audit.log.broken-{stamp}", f"audit.log.broken-{stamp}-1",
        f"audit.log.broken-{stamp}-1.head", f"audit.log.broken-{stamp}.head",
    ]


# -------------------------------------------------------------- concurrency
def test_concurrent_appends_form_one_valid_chain(log: AuditLog, log_path: Path) -> None:
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(50):
            log.append("kill", worker=n, i=i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    report = _with_head(log_path)
    assert report.ok, report.problems
    assert report.records == 400
    assert log.head == (399, report.head)
    seen = {(r["worker"], r["i"]) for r in map(json.loads, _lines(log_path))}
    assert len(seen) == 400


def test_timestamps_are_utc_with_microseconds(log_path: Path) -> None:
    with AuditLog.open(log_path) as log:
        log.append("x")

    ts = json.loads(_lines(log_path)[0])["ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ts)


def test_the_log_descriptor_is_not_inherited(log: AuditLog) -> None:
    """Agents are spawned by this process: they must never get the log's fd."""
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    log_fds = [fd for fd in fds if _target(fd) == str(log.path)]
    assert log_fds
    assert not any(os.get_inheritable(fd) for fd in log_fds)


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# ------------------------------------------------------------- a full disk
class _DiskFull:
    """Point the log's descriptor at /dev/full, where every write(2) fails with ENOSPC."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._saved = os.dup(log._fd)

    def __enter__(self) -> None:
        full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(full, self._log._fd)
        os.close(full)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, self._log._fd)
        os.close(self._saved)


def test_a_full_disk_keeps_records_waiting_in_order(log: AuditLog, log_path: Path) -> None:
    from daemon.errors import AuditUnavailable

    seen: list[dict[str, object]] = []
    log.add_listener(seen.append)
    assert log.append("daemon_start") is True
    with _DiskFull(log):
        # A kill's record: accepted, never an error, waiting.
        assert log.append("command", decision="accepted", action="kill") is False
        assert log.append("result", ok=True) is False
        assert log.pending == 2
        # A run's record is refused, and nothing is added.
        with pytest.raises(AuditUnavailable, match=rf"{re.escape(str(log_path))} cannot be "
                           r"written \(.*No space left on device.*\).*Free space"):
            log.append_or_refuse("command", decision="accepted", action="run")
        assert log.pending == 2
        assert not log.flush()
    # Listeners heard of the waiting records at once, marked as waiting.
    assert [r.get("audit_pending") for r in seen] == [None, True, True]
    assert log.flush()
    assert log.pending == 0
    events = [json.loads(line)["event"] for line in _lines(log_path)]
    assert events == ["daemon_start", "command", "result"]
    assert verify(log_path, expected_head=read_head(head_path(log_path))).ok
    log.append_or_refuse("command", decision="accepted", action="run")
    assert log.head[0] == 3


def test_past_the_backlog_cap_records_are_counted_not_kept(
        log: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.audit

    monkeypatch.setattr(daemon.audit, "MAX_BACKLOG", 3)
    with _DiskFull(log):
        for i in range(10):
            log.append("tripwire", n=i)
    assert log.flush()
    recs = [json.loads(line) for line in _lines(log_path)]
    assert [r["event"] for r in recs] == ["tripwire"] * 3 + ["audit_records_dropped"]
    assert (recs[-1]["count"], recs[-1]["first_event"]) == (7, "tripwire")
    assert verify(log_path, expected_head=read_head(head_path(log_path))).ok


def test_a_record_whose_head_could_not_be_written_is_never_written_twice(
        log: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line reached the file, the head file did not (a full disk's usual order)."""
    assert log.append("daemon_start") is True
    real = log._write_head
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise AuditWriteError("head file not updated: No space left on device")

    monkeypatch.setattr(log, "_write_head", refuse)
    assert log.append("command", decision="accepted", action="kill") is False
    assert not log.flush()
    monkeypatch.setattr(log, "_write_head", real)
    assert log.flush()
    assert calls  # the failure was forced
    events = [json.loads(line)["event"] for line in _lines(log_path)]
    assert events == ["daemon_start", "command"]
    assert verify(log_path, expected_head=read_head(head_path(log_path))).ok


def test_a_long_backlog_drains_in_chunks_with_one_sync_each(
        log: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.audit

    monkeypatch.setattr(daemon.audit, "FLUSH_CHUNK", 10)
    syncs = []
    real = log._sync_and_write_head
    monkeypatch.setattr(log, "_sync_and_write_head", lambda: (syncs.append(1), real())[1])
    with _DiskFull(log):
        for i in range(35):
            log.append("tripwire", n=i)
    syncs.clear()
    assert log.flush()
    assert len(syncs) == 4  # 10 + 10 + 10 + 5
    assert [json.loads(line)["n"] for line in _lines(log_path)] == list(range(35))
