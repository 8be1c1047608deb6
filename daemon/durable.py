"""Durable writes of the daemon's small state files: the one choke point.

Every state file the daemon keeps (replay cache, audit head, estop latch,
host id) is written here, so the care is taken once: root never writes
through a symlink or a hard link planted in the state directory, a file is
replaced whole or not at all, and a rename or unlink counts only once its
directory is synced (fsync(2): "calling fsync() on the file does not
necessarily ensure that the entry in the directory containing the file has
also reached disk").

Every function raises OSError; callers translate it into their own domain
error. Standard library only. The guardian (exec'd, never imported) keeps a
private copy of replace(); tests/unit/test_durable.py runs both through the
same tests.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# O_EXCL | O_NOFOLLOW: open(2) then fails on anything already at the name, a
# symlink (even a dangling one) or a hard link to some other file, instead of
# writing through it. O_CLOEXEC: agents must never inherit the descriptor.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def replace(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with a file holding `data` and `mode`, atomically and durably.

    Writes a temporary file with an unpredictable name in the same
    directory, fsyncs it, renames it over `path` (a symlink at `path` is
    replaced, never followed: rename(2)) and fsyncs the directory. On failure
    the temporary file is removed and `path` is as it was. Raises OSError.
    """
    tmp = _tmp_name(path)
    fd = os.open(tmp, _CREATE, mode)
    try:
        try:
            os.fchmod(fd, mode)  # open(2)'s mode is masked by the umask
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def append(path: Path, data: bytes) -> None:
    """Append `data` to the existing file `path` and fsync it; all of it or nothing.

    Never creates the file (one that vanished must not come back without
    what it held) and never follows a symlink at `path`. On failure the file
    is cut back to its old length, so no torn line is left. Raises OSError.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def create_exclusive(path: Path, *, mode: int = 0o600, append: bool = False) -> int:
    """Create `path` (which must not exist) with `mode`, durably; return its write fd.

    The directory is synced before returning, so the new entry survives a
    crash. `append` adds O_APPEND. Raises FileExistsError if anything,
    a symlink included, is at `path`; OSError otherwise.
    """
    fd = os.open(path, _CREATE | (os.O_APPEND if append else 0), mode)
    try:
        os.fchmod(fd, mode)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove(path: Path) -> None:
    """Unlink `path` if it exists and sync its directory. Raises OSError."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    # Synced even when already gone: an earlier unlink may not be durable yet.
    fsync_dir(path.parent)


def rename(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` (same directory) and sync the directory. Raises OSError."""
    os.rename(src, dst)
    fsync_dir(dst.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, making renames, creations and unlinks in it durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    # Unpredictable, so nobody can plant anything at it in advance; hidden
    # and ending in .tmp, so no reader's glob takes it for a finished file.
    return path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")


def _write_all(fd: int, data: bytes) -> None:
    # write(2) may write less than asked (a signal, a nearly full disk).
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
