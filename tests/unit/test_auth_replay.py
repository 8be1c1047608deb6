"""The replay cache: in memory, on disk, across restarts, and when lost."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from daemon.auth import ReplayCache
from daemon.errors import ReplayCacheDegraded, ReplayCacheIOError, Replayed

NOW = 1_750_000_000.0
WINDOW = 360.0  # max lifetime 300 s + skew 60 s


def _cmd(n: int) -> dict[str, bytes]:
    cid = n.to_bytes(16, "big")
    return {"command_id": cid, "payload_sha256": hashlib.sha256(cid).digest()}


def _reserve(cache: ReplayCache, n: int, action: str = "kill", now: float = NOW) -> None:
    cache.check_and_reserve(**_cmd(n), expires_at=now + 300, action=action, now=now)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "replay.jsonl"


@pytest.fixture
def cache(path: Path) -> ReplayCache:
    path.parent.mkdir()
    return ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=True)


def test_fresh_cache_is_not_degraded(cache: ReplayCache, path: Path) -> None:
    assert cache.degraded_until is None
    assert path.read_bytes() == b'{"agentd_replay": 1}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_accept_then_replay_is_refused(cache: ReplayCache) -> None:
    _reserve(cache, 1, "run")
    with pytest.raises(Replayed) as info:
        _reserve(cache, 1, "run", now=NOW + 1)
    assert info.value.message == (
        f"command {(1).to_bytes(16, 'big').hex()} was already accepted; "
        "replays are refused — sign a new command"
    )


def test_same_payload_hash_under_another_id_is_refused(cache: ReplayCache) -> None:
    _reserve(cache, 1)
    with pytest.raises(Replayed):
        cache.check_and_reserve(
            command_id=b"\x09" * 16,
            payload_sha256=_cmd(1)["payload_sha256"],
            expires_at=NOW + 300,
            action="kill",
            now=NOW,
        )


def test_reserve_does_no_io_until_persist(cache: ReplayCache, path: Path) -> None:
    before = path.read_bytes()
    _reserve(cache, 1)
    assert path.read_bytes() == before
    cache.persist()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1]) == {
        "id": (1).to_bytes(16, "big").hex(),
        "sha256": _cmd(1)["payload_sha256"].hex(),
        "exp": NOW + 300,
    }
    cache.persist()  # nothing new: nothing written
    assert len(path.read_text().splitlines()) == 2


def test_reopen_after_restart_still_refuses(cache: ReplayCache, path: Path) -> None:
    _reserve(cache, 1, "run")
    _reserve(cache, 2, "kill")
    cache.persist()
    reopened = ReplayCache.open(path, now=NOW + 10, window_s=WINDOW, fresh=False)
    assert reopened.degraded_until is None
    assert len(reopened) == 2
    for n in (1, 2):
        with pytest.raises(Replayed):
            _reserve(reopened, n, now=NOW + 10)
    _reserve(reopened, 3, "run", now=NOW + 10)


def test_unpersisted_entries_are_lost_on_restart(cache: ReplayCache, path: Path) -> None:
    _reserve(cache, 1)  # a kill, not yet persisted when the daemon dies
    reopened = ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=False)
    assert len(reopened) == 0


def test_expired_entries_are_pruned_on_reopen(cache: ReplayCache, path: Path) -> None:
    _reserve(cache, 1, now=NOW)  # expires NOW + 300
    _reserve(cache, 2, now=NOW + 500)  # expires NOW + 800
    cache.persist()
    later = NOW + 300 + WINDOW + 1  # entry 1 can no longer be replayed
    reopened = ReplayCache.open(path, now=later, window_s=WINDOW, fresh=False)
    assert len(reopened) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # compacted: header and entry 2
    assert json.loads(lines[1])["id"] == (2).to_bytes(16, "big").hex()
    _reserve(reopened, 1, now=later)  # forgotten, and harmless: verify() refuses it as expired


def _ids_in(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()[1:]]


def test_prune_drops_old_entries_from_memory_and_the_file(cache: ReplayCache,
                                                           path: Path) -> None:
    _reserve(cache, 1, now=NOW)
    _reserve(cache, 2, now=NOW + 500)
    cache.persist()
    assert cache.prune(NOW + 300 + WINDOW) == 0
    assert len(cache) == 2  # exactly at the horizon: kept
    assert len(_ids_in(path)) == 2
    assert cache.prune(NOW + 300 + WINDOW + 1) == 1
    assert len(cache) == 1
    # Without a restart: the file no longer holds entry 1.
    assert _ids_in(path) == [(2).to_bytes(16, "big").hex()]
    assert path.read_text().splitlines()[0] == '{"agentd_replay": 1}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _reserve(cache, 1, now=NOW + 300 + WINDOW + 1)  # forgotten (verify() refuses it as expired)
    with pytest.raises(Replayed):
        _reserve(cache, 2, now=NOW + 300 + WINDOW + 1)


def test_prune_with_nothing_expired_leaves_the_file_alone(cache: ReplayCache,
                                                          path: Path) -> None:
    _reserve(cache, 1)
    cache.persist()
    before = path.stat()
    assert cache.prune(NOW + 1) == 0
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_prune_writes_pending_entries_and_persist_does_not_repeat_them(
        cache: ReplayCache, path: Path) -> None:
    _reserve(cache, 1, now=NOW)
    cache.persist()
    later = NOW + 300 + WINDOW + 1
    _reserve(cache, 2, now=later)  # accepted, not yet persisted
    assert cache.prune(later) == 1
    assert _ids_in(path) == [(2).to_bytes(16, "big").hex()]
    cache.persist()
    assert _ids_in(path) == [(2).to_bytes(16, "big").hex()]
    reopened = ReplayCache.open(path, now=later, window_s=WINDOW, fresh=False)
    with pytest.raises(Replayed):
        _reserve(reopened, 2, now=later)


def test_prune_that_cannot_rewrite_loses_nothing(
    cache: ReplayCache, path: Path,
    file_size_limit: Callable[[int], AbstractContextManager[None]],
) -> None:
    _reserve(cache, 1, now=NOW)
    cache.persist()
    later = NOW + 300 + WINDOW + 1
    _reserve(cache, 2, now=later)
    # The rewrite's temporary file cannot be written past 10 bytes (EFBIG).
    with file_size_limit(10), pytest.raises(ReplayCacheIOError, match="cannot be written"):
        cache.prune(later)
    assert len(_ids_in(path)) == 1  # the old file, intact
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    cache.persist()  # entry 2 is still queued
    assert _ids_in(path)[-1] == (2).to_bytes(16, "big").hex()


def _corrupt(path: Path, data: bytes) -> ReplayCache:
    path.write_bytes(data)
    return ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=False)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"agentd_replay": 2}\n', id="wrong-header"),
        pytest.param(b"garbage\n", id="no-header"),
        pytest.param(b'{"agentd_replay": 1}\n{"id": "00", "sha', id="torn-last-line"),
        pytest.param(
            b'{"agentd_replay": 1}\n{"id": "zz", "sha256": "00", "exp": 1}\n', id="bad-hex"
        ),
        pytest.param(b'{"agentd_replay": 1}\n[1, 2]\n', id="not-an-object"),
        pytest.param(b'{"agentd_replay": 1}\n\n', id="blank-line"),
    ],
)
def test_corrupt_file_degrades_and_is_kept_aside(path: Path, data: bytes) -> None:
    path.parent.mkdir()
    cache = _corrupt(path, data)
    assert cache.degraded_until == NOW + WINDOW
    aside = path.with_name(f"{path.name}.corrupt-{int(NOW)}")
    assert aside.read_bytes() == data  # kept for forensics
    assert path.read_bytes() == b'{"agentd_replay": 1}\n'  # a new, valid file


def test_degraded_refuses_run_but_allows_stop_and_kill(path: Path) -> None:
    path.parent.mkdir()
    cache = _corrupt(path, b"torn")
    with pytest.raises(ReplayCacheDegraded) as info:
        _reserve(cache, 1, "run")
    msg = info.value.message
    assert f"replay cache {path} was corrupt (torn last line; kept as " in msg
    assert "at start-up, so an old command could be replayed" in msg
    assert "until 2025-06-15T15:12:40+00:00" in msg
    assert "only stop, kill and estop are accepted" in msg
    _reserve(cache, 2, "stop")
    _reserve(cache, 3, "kill")
    with pytest.raises(Replayed):  # replays of stops are still refused
        _reserve(cache, 3, "kill")
    with pytest.raises(ReplayCacheDegraded):
        _reserve(cache, 1, "run", now=NOW + WINDOW - 1)


def test_degraded_ends_after_window(path: Path) -> None:
    path.parent.mkdir()
    cache = _corrupt(path, b"torn")
    _reserve(cache, 1, "run", now=NOW + WINDOW)
    assert cache.degraded_until is None


def test_prune_also_ends_degraded_mode(path: Path) -> None:
    path.parent.mkdir()
    cache = _corrupt(path, b"torn")
    cache.prune(NOW + WINDOW - 1)
    assert cache.degraded_until == NOW + WINDOW
    cache.prune(NOW + WINDOW)
    assert cache.degraded_until is None


def test_missing_file_not_fresh_is_degraded(path: Path) -> None:
    path.parent.mkdir()
    cache = ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=False)
    assert cache.degraded_until == NOW + WINDOW
    assert path.exists()
    with pytest.raises(ReplayCacheDegraded, match=rf"replay cache {path} was missing at start-up"):
        _reserve(cache, 1, "run")
    _reserve(cache, 2, "kill")


def test_missing_file_fresh_is_not_degraded(path: Path) -> None:
    path.parent.mkdir()
    cache = ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=True)
    assert cache.degraded_until is None
    _reserve(cache, 1, "run")


def test_second_corruption_does_not_overwrite_first(path: Path) -> None:
    path.parent.mkdir()
    _corrupt(path, b"first")
    _corrupt(path, b"second")
    assert path.with_name(f"{path.name}.corrupt-{int(NOW)}").read_bytes() == b"first"
    assert path.with_name(f"{path.name}.corrupt-{int(NOW)}.1").read_bytes() == b"second"


def test_persist_failure_raises_domain_error_and_keeps_entries(
    cache: ReplayCache, path: Path
) -> None:
    _reserve(cache, 1, "run")
    path.unlink()  # the file vanished under the daemon
    with pytest.raises(ReplayCacheIOError, match=rf"replay cache {path} cannot be written"):
        cache.persist()
    with pytest.raises(Replayed):  # still refused in memory
        _reserve(cache, 1, "run")


def test_unreadable_file_is_a_domain_error(path: Path) -> None:
    path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ReplayCacheIOError, match="cannot be read: Is a directory"):
        ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=False)


def test_file_mode_is_fixed_on_compaction(cache: ReplayCache, path: Path) -> None:
    os.chmod(path, 0o644)
    ReplayCache.open(path, now=NOW, window_s=WINDOW, fresh=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_reservations_accept_exactly_one(cache: ReplayCache) -> None:
    import threading

    accepted: list[int] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            _reserve(cache, 42)
        except Replayed:
            return
        accepted.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 1
