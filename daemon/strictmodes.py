"""A directory root may trust: sshd's StrictModes for the dev daemon's directory.

`agentd --dev DIR` reads its config, trust store and policies from DIR and
writes its audit log and state there, as root. Whoever else can write DIR,
a file in it, or any directory above it, could name a detector command, plant
a key, or plant a symlink where root then writes. check() refuses such a DIR
with what is wrong and the command that fixes it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from daemon.errors import ConfigError

_GO_W = stat.S_IWGRP | stat.S_IWOTH


def check(directory: Path) -> None:
    """Refuse directory unless only root can change it, its contents or its parents.

    directory must be absolute and symlink-free (Path.resolve()); it need not
    exist yet, and then only its existing ancestors are checked. Ancestors
    must be root's and not writable by group or others, unless sticky (/tmp:
    nobody else may rename or remove root's entries there, unlink(2)). DIR
    and everything in it must be root's and not writable by group or others;
    no symlinks (what one points to is not vetted). Raises ConfigError.
    """
    chain = [directory, *directory.parents]
    for p in reversed(chain[1:]):
        if p.exists():
            _check_one(p, os.lstat(p), ancestor=True)
    if not os.path.lexists(directory):
        return
    _check_one(directory, os.lstat(directory), ancestor=False)
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            p = Path(root, name)
            _check_one(p, os.lstat(p), ancestor=False)


def _check_one(p: Path, st: os.stat_result, *, ancestor: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"{p} is a symbolic link: root would follow it to a file nobody vetted; "
            f"replace it with the file itself (or remove it)")
    if st.st_uid != 0:
        where = "above the dev directory" if ancestor else "in the dev directory"
        raise ConfigError(
            f"{p} ({where}) is owned by uid {st.st_uid}, not root: its owner could change "
            f"what the daemon trusts; run 'chown root {p}', or use a dev directory whose "
            "every parent is root's")
    if not st.st_mode & _GO_W:
        return
    if ancestor and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return  # sticky, like /tmp: root's entries cannot be renamed or removed by others
    if stat.S_ISSOCK(st.st_mode):
        return  # the API's socket: its mode is the daemon's gate, and it is made anew
    raise ConfigError(
        f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): they "
        f"could change what the daemon trusts or writes; run 'chmod go-w {p}'")
