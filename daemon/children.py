"""The daemon's child processes: the ones it starts, and the orphans it inherits.

The daemon is a child subreaper (PR_SET_CHILD_SUBREAPER, prctl(2)), as
containerd's shim and tini are: a process of an agent's tree whose parent
dies is re-parented to the daemon, not to the host's init. Without it, the
init of an agent's PID namespace (bwrap's inner process, a child of bwrap's
outer one) lingers as a zombie of the host's init after every kill, for as
long as that init takes to reap, and on hosts or containers whose init
reaps slowly zombies pile up.

So the daemon must reap what it inherits, and nothing else: a child that a
subprocess.Popen owns is reaped by that Popen (reaping it here would leave
the Popen with ECHILD and a made-up exit status of 0). Every Popen the
daemon makes is started through spawn(), which records it under the same
lock the reaper takes, so the reaper never sees a child of ours it does not
know about.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

T = TypeVar("T", bound="subprocess.Popen[bytes]")

_lock = threading.Lock()
_ours: dict[int, subprocess.Popen[bytes]] = {}


def become_subreaper() -> None:
    """Make this process the reaper of its descendants' orphans. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def spawn(start: Callable[[], T]) -> T:
    """Run start() (which makes one Popen) so that the reaper knows the child as ours."""
    with _lock:
        proc = start()
        _ours[proc.pid] = proc
        return proc


def reap_orphans() -> list[int]:
    """Reap every exited child that no Popen of ours owns; returns their pids.

    Never blocks: if a spawn holds the lock, it returns at once (the next
    call reaps). waitid(2) with WNOWAIT peeks at one exited child without
    reaping it. One of ours is reaped through its own Popen.poll(), so its
    owner still gets its exit status; one whose owner is reaping it at that
    moment ends this pass, and the next pass goes on past it.
    """
    if not _lock.acquire(blocking=False):
        return []
    reaped: list[int] = []
    try:
        # Popens already reaped by their owners: their pids may be reused.
        for pid in [p for p, proc in _ours.items() if proc.returncode is not None]:
            del _ours[pid]
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            ours = _ours.get(info.si_pid)
            if ours is not None:
                # Reaped through its Popen, which keeps the status for its
                # owner; None if the owner is reaping it right now.
                if ours.poll() is None:
                    break
                del _ours[info.si_pid]
                continue
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                break
            reaped.append(info.si_pid)
    finally:
        _lock.release()
    if reaped:
        log.debug("reaped %d inherited process(es): %s", len(reaped), reaped)
    return reaped
