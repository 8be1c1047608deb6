"""The agent's entrypoint, resolved and hashed by the daemon before launch."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

from daemon.errors import EntrypointMismatch, FailedPrecondition

_CHUNK = 1 << 20
# Hashes of files already hashed, by what identifies one version of a file:
# device, inode, size, and the modification and change times in ns. A write
# to the file, a rename over it or a chmod moves st_ctime, which no
# unprivileged call can set back (inode(7)): a hit is the same bytes. An
# interpreter is 6 MB; hashing it was an eighth of every launch.
_CACHE_MAX = 256
_cache: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Entrypoint:
    path: str  # the absolute path bwrap execs: argv[0] resolved on the agent's PATH
    sha256: str  # "" when it could not be read (then it cannot be pinned either)
    error: str = ""
    missing: bool = False  # no such file: the agent could not be started either


def resolve(argv0: str, path_env: str) -> Entrypoint:
    """Find argv[0] as execvp(3) would on the agent's PATH and hash it, as root.

    path_env must be the PATH the agent itself gets: the launch then execs
    the returned absolute path, so what runs is the file hashed here, not
    whatever the sandbox's own PATH lookup would find. A relative argv[0]
    or PATH entry names the agent's working directory, a fresh empty
    scratch tmpfs, so nothing is found there.

    The file is opened once, and that descriptor is both checked (a regular
    file) and hashed, so what is hashed is one file, not a path looked up
    twice. Never raises: an unreadable entrypoint is reported in .error.
    """
    if "/" in argv0:
        if not os.path.isabs(argv0):
            return Entrypoint(path=argv0, sha256="", missing=True,
                              error="a relative path names the sandbox's empty working "
                                    "directory; give an absolute path")
        found: str | None = argv0
    else:
        absolute = os.pathsep.join(d for d in path_env.split(os.pathsep) if os.path.isabs(d))
        found = shutil.which(argv0, path=absolute) if absolute else None
    if found is None:
        return Entrypoint(path=argv0, sha256="", error="not found on the agent's PATH",
                          missing=True)
    found = os.path.normpath(found)
    try:
        fd = os.open(found, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as err:
        return Entrypoint(path=found, sha256="", error=err.strerror or str(err),
                          missing=isinstance(err, FileNotFoundError))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Entrypoint(path=found, sha256="", error="not a regular file")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _cache_lock:
            known = _cache.get(key)
            if known is not None:
                _cache.move_to_end(key)
                return Entrypoint(path=found, sha256=known)
        h = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        after = os.fstat(fd)
    except OSError as err:
        return Entrypoint(path=found, sha256="", error=err.strerror or str(err))
    finally:
        os.close(fd)
    digest = h.hexdigest()
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[2:]:
        # Unchanged while it was read: this hash is of that version.
        with _cache_lock:
            _cache[key] = digest
            while len(_cache) > _CACHE_MAX:
                _cache.popitem(last=False)
    return Entrypoint(path=found, sha256=digest)


def check(entry: Entrypoint, pinned: str) -> None:
    """Refuse the launch unless entry hashes to pinned ("" pins nothing).

    Raises EntrypointMismatch naming both hashes, or FailedPrecondition when
    a pinned entrypoint cannot be read.
    """
    if not pinned:
        return
    if not entry.sha256:
        raise FailedPrecondition(
            f"the entrypoint is pinned to sha256 {pinned}, but {entry.path} cannot be hashed: "
            f"{entry.error}")
    if entry.sha256 != pinned:
        raise EntrypointMismatch(
            f"entrypoint {entry.path} has sha256 {entry.sha256}, but the run is pinned to "
            f"{pinned}; the program changed, or the pin is wrong")
