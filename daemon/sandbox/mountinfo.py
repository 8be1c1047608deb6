"""An agent's mount table as the kernel shows it (/proc/PID/mountinfo), held against its view.

proc(5): each line of mountinfo is "ID PARENT MAJ:MIN ROOT MOUNT-POINT
OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS", mount points relative
to the process's own root, with space, tab, newline and backslash escaped as
octal. Read as root from the host, it is what the
agent's mount namespace holds, whatever the agent says.

Pure functions over text and views, so their logic is tested on fake tables
(tests/unit); daemon.sandbox.verify does the reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from daemon.sandbox.bwrap import Mount

# Mounts bwrap makes on its own beside the view: the device nodes of --dev
# (bound from the host's /dev), its devpts, /dev/console when started on a
# terminal, and the read-only covers some versions put over parts of --proc.
BWRAP_OWN = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                       "/dev/tty", "/dev/pts", "/dev/console", "/proc/sys",
                       "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"})
_ESCAPE = re.compile(r"\\([0-7]{3})")
_FSTYPE = {"root": "tmpfs", "proc": "proc", "dev": "tmpfs", "tmpfs": "tmpfs", "hide": "tmpfs"}


@dataclass(frozen=True)
class Entry:
    """One line of mountinfo."""

    mount_point: str
    root: str  # the path within its filesystem that is mounted there
    fstype: str
    read_only: bool  # the per-mount flag, the one a remount or a read-only bind sets
    dev: str = ""  # MAJ:MIN of the filesystem


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Entry]:
    """The entries of a mountinfo text, in its order (a later entry on a path lies on top)."""
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, sup = pre.split(), post.split()
        if not sep or len(fields) < 6 or not sup:
            continue
        out.append(Entry(mount_point=_unescape(fields[4]), root=_unescape(fields[3]),
                         fstype=sup[0], read_only=fields[5].split(",")[0] == "ro",
                         dev=fields[2]))
    return out


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip("/") + "/")


def submounts(host: Iterable[Entry], view: Sequence[Mount]) -> dict[str, bool]:
    """Host mount points strictly below a bind's source, which the bind carries along
    (bwrap binds recursively), with whether each may be writable (only below a bind_rw)."""
    out: dict[str, bool] = {}
    binds = [m for m in view if m.kind == "bind"]
    for e in host:
        for m in binds:
            if _under(e.mount_point, m.source):
                dest = m.path + e.mount_point[len(m.source):]
                out[dest] = out.get(dest, False) or m.writable
    return out


def origin(host: Sequence[Entry], path: str) -> tuple[str, str] | None:
    """(MAJ:MIN, root) that a bind of the host's path shows in mountinfo; None if not found.

    The host mount holding path is the last one on the longest mount point
    above it (a later mount on the same point lies on top); a bind of path
    shows that filesystem, rooted at the mount's root plus the rest of path.
    """
    best: Entry | None = None
    for e in host:
        holds = path == e.mount_point or _under(path, e.mount_point) or e.mount_point == "/"
        if holds and (best is None or len(e.mount_point) >= len(best.mount_point)):
            best = e
    if best is None:
        return None
    rest = path[len(best.mount_point.rstrip("/")):].lstrip("/")
    root = best.root.rstrip("/") + "/" + rest if rest else best.root
    return best.dev, root


def compare(view: Sequence[Mount], entries: Sequence[Entry],
            host: Sequence[Entry] = ()) -> list[str]:
    """What differs between the view and the mount table: each problem in words, [] if none.

    Every mount of the view must be there (the top one on its path) with its
    filesystem type and read-only flag, and each bind and mask must show its
    source's filesystem and path, found in host (the daemon's own mount
    table). Nothing may be mounted that the view does not name, besides
    bwrap's own (BWRAP_OWN) and what binds carry along from host
    (submounts()), which must be read-only below a read-only bind.
    """
    top = {e.mount_point: e for e in entries}
    carried = submounts(host, view)
    problems = []
    for m in view:
        if not m.is_mount:
            continue
        e = top.get(m.path)
        if e is None:
            problems.append(f"{m.path} ({m.kind} {m.source}) is not mounted")
            continue
        want = _FSTYPE.get(m.kind)
        if want and e.fstype != want:
            problems.append(f"{m.path} is {e.fstype}, not {want}")
        if m.kind != "proc" and e.read_only == m.writable:
            problems.append(f"{m.path} is {'read-only' if e.read_only else 'writable'}, "
                            f"not {'writable' if m.writable else 'read-only'}")
        if m.kind in ("bind", "mask") and host:
            want_from = origin(host, m.source)
            if (e.dev, e.root) != want_from:
                problems.append(f"{m.path} shows {e.dev} {e.root}, not the host's {m.source}"
                                + (f" ({want_from[0]} {want_from[1]})" if want_from else ""))
    named = {m.path for m in view if m.is_mount}
    for path, e in top.items():
        if path in named or path in BWRAP_OWN:
            continue
        if path in carried:
            if not carried[path] and not e.read_only:
                problems.append(f"{path} (carried by a read-only bind) is writable")
            continue
        problems.append(f"unexpected mount {path} ({e.fstype} {e.root})")
    return problems
