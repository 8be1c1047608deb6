"""Secrets: read the daemon's trust store, audit log, replay cache, keys and agent logs.

The sandbox hides the daemon's state: these paths must not open, whichever
way the agent spells them: directly, through /proc/1/root or the daemon's
/proc/PID/root and /proc/PID/cwd, after chdir into the directory, or with
openat from a directory descriptor. The daemon's open descriptors, memory
and environment are out of reach too.
"""
import os

from escapelib import attempt, done, reading, targets

t = targets()
daemon = t["daemon_pid"]


def after_chdir(path):
    def go():
        here = os.open(".", os.O_RDONLY)
        try:
            os.chdir(os.path.dirname(path))
            return reading(os.path.basename(path))()
        finally:
            os.fchdir(here)
            os.close(here)
    return go


def via_dirfd(path):
    def go():
        d = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
        try:
            return reading(os.path.basename(path), dir_fd=d)()
        finally:
            os.close(d)
    return go


def daemon_fds():
    names = os.listdir(f"/proc/{daemon}/fd")
    opened = 0
    for name in names:
        try:
            reading(f"/proc/{daemon}/fd/{name}")()
            opened += 1
        except OSError:
            pass
    return f"listed-{len(names)}-opened-{opened}"


for label, path in t["secrets"].items():
    attempt(f"{label}:by-path", reading(path))
    attempt(f"{label}:via-proc1-root", reading("/proc/1/root" + path))
    attempt(f"{label}:via-daemon-root", reading(f"/proc/{daemon}/root" + path))
    attempt(f"{label}:after-chdir", after_chdir(path))
    attempt(f"{label}:openat-dirfd", via_dirfd(path))
attempt("state-dir:listdir", lambda: f"{len(os.listdir(t['state_dir']))}-entries")
attempt("daemon:cwd", lambda: f"{len(os.listdir(f'/proc/{daemon}/cwd'))}-entries")
attempt("daemon:fds", daemon_fds)
attempt("daemon:environ", reading(f"/proc/{daemon}/environ"))
attempt("daemon:mem", reading(f"/proc/{daemon}/mem"))
attempt("daemon:maps", reading(f"/proc/{daemon}/maps"))
done()
