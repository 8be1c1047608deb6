"""The one choke point for cgroupfs I/O.

Every read and write of a cgroup file goes through here, so that errors carry
the path and what was written (as runc's cgroups/file.go does) and the rest of
the daemon never sees a bare OSError.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from daemon.errors import CgroupError


def _read_raw(path: Path) -> bytes:
    # os.open/os.read, not open(): the sampler reads a few of these per agent
    # every second, and the buffered text layer cost it four times the
    # syscalls' own time (issue 12). Raises OSError.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read(path: Path) -> str:
    """Return the contents of a cgroup file. Raises CgroupError."""
    try:
        return _read_raw(path).decode("ascii")
    except OSError as err:
        raise CgroupError(f"failed to read {path}: {err.strerror}", str(path)) from err


def write(path: Path, data: str) -> None:
    """Write data to a cgroup file in one write(2). Raises CgroupError.

    cgroupfs acts on each write(2) separately, so the value must go in one
    call: no buffering, no partial writes.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as err:
        raise CgroupError(f"failed to open {path}: {err.strerror}", str(path)) from err
    try:
        os.write(fd, data.encode("ascii"))
    except OSError as err:
        raise CgroupError(
            f"failed to write {data!r} to {path}: {err.strerror}", str(path)
        ) from err
    finally:
        os.close(fd)


def exists(path: Path) -> bool:
    """Whether a cgroup file or directory exists."""
    return os.path.exists(path)


def read_pids(path: Path) -> list[int]:
    """Parse cgroup.procs (one pid a line). Raises CgroupError.

    A cgroup removed meanwhile reads as empty: its processes are gone.
    """
    try:
        return [int(line) for line in _read_raw(path).split()]
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CgroupError(f"failed to read {path}: {err.strerror}", str(path)) from err


def read_keyed(path: Path) -> dict[str, str]:
    """Parse a flat keyed file such as cgroup.events ("populated 1\\nfrozen 0")."""
    out: dict[str, str] = {}
    for line in read(path).splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def mkdir(path: Path) -> None:
    """Create a cgroup directory; an existing one is fine. Raises CgroupError."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as err:
        raise CgroupError(f"failed to create cgroup {path}: {err.strerror}", str(path)) from err


def rmdir(path: Path) -> bool:
    """Remove an empty cgroup directory. Returns False while it is busy.

    rmdir(2) of a cgroup fails with EBUSY while it has members or children;
    a missing directory counts as removed.
    """
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise CgroupError(f"failed to remove cgroup {path}: {err.strerror}", str(path)) from err
    return True


def children(path: Path) -> list[Path]:
    """Child cgroup directories of path (none if path is gone)."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CgroupError(f"failed to list {path}: {err.strerror}", str(path)) from err


# Held handles. An agent's cgroup.kill and cgroup.events stay open for its
# life, so a kill is one write(2) and a "still populated?" check one pread(2):
# in a Python daemon every syscall is a point where another thread may take
# the interpreter, and a mass kill of 1000 agents paid for three a cgroup.
# An open file does not keep a cgroup from being removed; afterwards its
# operations fail with ENODEV.


def open_handle(path: Path, *, write: bool) -> int:
    """Open a cgroup file to keep. Raises CgroupError."""
    try:
        return os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as err:
        raise CgroupError(f"failed to open {path}: {err.strerror}", str(path)) from err


def write_handle(fd: int, data: str, path: Path) -> None:
    """One write(2) to a held handle. Raises CgroupError (errno ENODEV: cgroup removed)."""
    try:
        os.write(fd, data.encode("ascii"))
    except OSError as err:
        raise CgroupError(
            f"failed to write {data!r} to {path}: {err.strerror}", str(path)) from err


def read_handle(fd: int, path: Path) -> str | None:
    """Re-read a held handle from offset 0; None if the cgroup was removed."""
    try:
        return os.pread(fd, 4096, 0).decode("ascii")
    except OSError as err:
        if err.errno == errno.ENODEV:
            return None
        raise CgroupError(f"failed to read {path}: {err.strerror}", str(path)) from err


def close_handle(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
