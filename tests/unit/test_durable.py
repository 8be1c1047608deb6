"""daemon/durable.py, and the guardian's private copy of replace(): same tests for both.

Real files, real write failures (RLIMIT_FSIZE), real threads; the only patch
pins the temporary name, to plant something at it in advance.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from daemon import durable, guardian

SizeLimit = Callable[[int], AbstractContextManager[None]]
PRECIOUS = b"root's precious file\n"


@dataclass(frozen=True)
class Impl:
    """One implementation of replace(path, data, mode)."""

    module: ModuleType
    call: Callable[[Path, bytes, int], None]
    tmp_name: Callable[[Path], Path]

    def replace(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        self.call(path, data, mode)

    def pin_tmp_name(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> Path:
        """Make the next temporary name for `path` predictable; return it."""
        name = self.tmp_name(path)
        as_given = name if self.module is durable else str(name)
        monkeypatch.setattr(self.module, "_tmp_name", lambda _path: as_given)
        return name


IMPLS = {
    "durable": Impl(durable, lambda p, d, m: durable.replace(p, d, mode=m), durable._tmp_name),
    "guardian": Impl(guardian, lambda p, d, m: guardian._replace(str(p), d, m),
                     lambda p: Path(guardian._tmp_name(str(p)))),
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> Impl:
    return IMPLS[request.param]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(PRECIOUS)
    return v


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_the_guardian_copy_opens_with_the_same_flags() -> None:
    assert guardian._CREATE == durable._CREATE
    for flag in (os.O_CREAT, os.O_EXCL, os.O_NOFOLLOW, os.O_CLOEXEC):
        assert durable._CREATE & flag


# ------------------------------------------------------------------ replace
def test_replace_writes_the_data(impl: Impl, state: Path) -> None:
    impl.replace(state / "f", b"one")
    impl.replace(state / "f", b"two")
    assert (state / "f").read_bytes() == b"two"
    assert os.listdir(state) == ["f"]


def test_a_symlink_at_the_target_is_replaced_not_followed(
        impl: Impl, state: Path, victim: Path) -> None:
    (state / "f").symlink_to(victim)
    impl.replace(state / "f", b"new")
    assert victim.read_bytes() == PRECIOUS
    assert not (state / "f").is_symlink() and (state / "f").read_bytes() == b"new"


def test_symlinks_at_the_old_predictable_temp_names_are_left_alone(
        impl: Impl, state: Path, victim: Path) -> None:
    # The names the replay cache, the audit head, the latch, the host id and
    # the guardian used before they shared one helper.
    planted = [state / ".f.json.tmp", state / "f.json.tmp", state / "f.tmp"]
    for p in planted:
        p.symlink_to(victim)
    impl.replace(state / "f.json", b"new")
    assert victim.read_bytes() == PRECIOUS
    assert (state / "f.json").read_bytes() == b"new"
    assert all(p.is_symlink() for p in planted)


@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "hardlink"])
def test_anything_planted_at_the_temp_name_is_never_written_through(
        impl: Impl, state: Path, victim: Path, kind: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (state / "f").write_bytes(b"old")
    tmp = impl.pin_tmp_name(monkeypatch, state / "f")
    if kind == "symlink":
        tmp.symlink_to(victim)
    elif kind == "dangling-symlink":
        tmp.symlink_to(state / "would-be-created")
    else:
        os.link(victim, tmp)
    with pytest.raises(FileExistsError):
        impl.replace(state / "f", b"new")
    assert victim.read_bytes() == PRECIOUS
    assert not (state / "would-be-created").exists()
    assert (state / "f").read_bytes() == b"old"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(
        impl: Impl, state: Path, file_size_limit: SizeLimit) -> None:
    (state / "f").write_bytes(b"old")
    with file_size_limit(4096), pytest.raises(OSError) as err:
        impl.replace(state / "f", b"x" * 65536)
    assert err.value.errno == errno.EFBIG
    assert (state / "f").read_bytes() == b"old"
    assert os.listdir(state) == ["f"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644], ids=oct)
def test_the_result_has_the_requested_mode_whatever_the_umask(
        impl: Impl, state: Path, mode: int, umask_077: None) -> None:
    (state / "f").write_bytes(b"old")
    (state / "f").chmod(0o666)
    impl.replace(state / "f", b"new", mode)
    assert stat.S_IMODE((state / "f").stat().st_mode) == mode


def test_concurrent_replaces_leave_one_whole_version(impl: Impl, state: Path) -> None:
    target, size, writers, rounds = state / "f", 256 * 1024, 6, 15
    impl.replace(target, bytes([0]) * size)
    errors: list[BaseException] = []
    torn: list[str] = []
    done = threading.Event()

    def write(n: int) -> None:
        try:
            for _ in range(rounds):
                impl.replace(target, bytes([n]) * size)
        except BaseException as err:
            errors.append(err)

    def read() -> None:
        while not done.is_set():
            data = target.read_bytes()
            if len(data) != size or data.count(data[:1]) != size:
                torn.append(f"{len(data)} bytes, starting {data[:1]!r}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(1, writers + 1)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert errors == [] and torn == []
    data = target.read_bytes()
    assert len(data) == size and data.count(data[:1]) == size and data[0] != 0
    assert os.listdir(state) == ["f"]


# ------------------------------------------------------------------ append
def test_append_adds_and_never_creates(state: Path) -> None:
    (state / "log").write_bytes(b"a\n")
    durable.append(state / "log", b"b\n")
    assert (state / "log").read_bytes() == b"a\nb\n"
    with pytest.raises(FileNotFoundError):
        durable.append(state / "gone", b"x\n")
    assert not (state / "gone").exists()


def test_append_never_follows_a_symlink(state: Path, victim: Path) -> None:
    (state / "log").symlink_to(victim)
    with pytest.raises(OSError) as err:
        durable.append(state / "log", b"x\n")
    assert err.value.errno == errno.ELOOP
    assert victim.read_bytes() == PRECIOUS


def test_a_failed_append_is_cut_back(state: Path, file_size_limit: SizeLimit) -> None:
    (state / "log").write_bytes(b"a\n")
    with file_size_limit(10), pytest.raises(OSError) as err:
        durable.append(state / "log", b"b" * 100 + b"\n")
    assert err.value.errno == errno.EFBIG
    assert (state / "log").read_bytes() == b"a\n"


# ------------------------------------------------------- create and remove
def test_create_exclusive_refuses_a_planted_symlink(
        state: Path, victim: Path, umask_077: None) -> None:
    (state / "log").symlink_to(victim)
    with pytest.raises(FileExistsError):
        durable.create_exclusive(state / "log")
    assert victim.read_bytes() == PRECIOUS
    fd = durable.create_exclusive(state / "new", mode=0o640, append=True)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)


def test_remove_unlinks_a_symlink_not_its_target(state: Path, victim: Path) -> None:
    (state / "latch").symlink_to(victim)
    durable.remove(state / "latch")
    assert not (state / "latch").is_symlink() and victim.read_bytes() == PRECIOUS
    durable.remove(state / "latch")  # already gone: fine


def test_rename_moves_within_the_directory(state: Path) -> None:
    (state / "a").write_bytes(b"x")
    durable.rename(state / "a", state / "b")
    assert os.listdir(state) == ["b"]
