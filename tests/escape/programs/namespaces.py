"""Namespaces and mounts: mount, unshare, clone, setns, pivot_root, the new mount API.

Each needs CAP_SYS_ADMIN, which the agent does not hold, or a new user
namespace, which the seccomp filter refuses (unshare and clone with
CLONE_NEWUSER; clone3, whose flags seccomp cannot read, must fail whole).
Every attempt runs in a forked child: one that worked must not change the
attempts after it. The children (and those clone(2) made) stay alive until
the agent is killed: the host reads their namespaces and mounts from /proc.
"""
import ctypes
import os

from escapelib import attempt, done, fact, hold, in_child, syscall, targets

t = targets()
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
CLONE_NEWPID, CLONE_NEWCGROUP, SIGCHLD = 0x20000000, 0x02000000, 17
scratch = os.getcwd()


def kept(fn):
    return in_child(fn, keep=True)


def unshare(flags):
    return lambda: kept(lambda: syscall("unshare", flags))


def clone(flags):
    """clone(2) like fork, into new namespaces; the new child stays (for the host to see)."""
    def child():
        pid = syscall("clone", flags | SIGCHLD, 0, 0, 0, 0)
        if pid == 0:
            hold()
        return f"child-{pid}"
    return lambda: kept(child)


class CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def clone3(flags):
    def child():
        args = CloneArgs(flags=flags, exit_signal=SIGCHLD)
        pid = syscall("clone3", ctypes.byref(args), ctypes.sizeof(args))
        if pid == 0:
            hold()
        return f"child-{pid}"
    return lambda: kept(child)


def mount_tmpfs():
    target = os.path.join(scratch, f"{t['tag']}-mnt")
    os.makedirs(target, exist_ok=True)
    return kept(lambda: syscall("mount", b"none", target.encode(), b"tmpfs", 0, None))


def setns(path):
    def child():
        fd = os.open(path, os.O_RDONLY)
        return syscall("setns", fd, 0)
    return lambda: kept(child)


try:  # A plain clone3 is a fork: allowed or ENOSYS (glibc falls back), never an escape.
    fact("clone3-plain", clone3(0)())
except OSError as err:
    fact("clone3-plain", err.strerror)
attempt("mount-tmpfs", mount_tmpfs)
attempt("unshare-user", unshare(CLONE_NEWUSER))
attempt("unshare-user+mount", unshare(CLONE_NEWUSER | CLONE_NEWNS))
attempt("unshare-user+net", unshare(CLONE_NEWUSER | CLONE_NEWNET))
attempt("unshare-mount", unshare(CLONE_NEWNS))
attempt("unshare-pid+cgroup", unshare(CLONE_NEWPID | CLONE_NEWCGROUP))
attempt("clone-newuser", clone(CLONE_NEWUSER))
attempt("clone3-newuser", clone3(CLONE_NEWUSER))
for ns in ("mnt", "net", "pid", "user", "cgroup"):
    attempt(f"setns-init-{ns}", setns(f"/proc/1/ns/{ns}"))
    attempt(f"setns-daemon-{ns}", setns(f"/proc/{t['daemon_pid']}/ns/{ns}"))
attempt("pivot_root", lambda: kept(lambda: syscall("pivot_root", b".", b".")))
attempt("chroot", lambda: kept(lambda: os.chroot(scratch)))
attempt("open_tree-clone", lambda: in_child(lambda: syscall("open_tree", -100, b"/", 1)))
attempt("fsopen-tmpfs", lambda: in_child(lambda: syscall("fsopen", b"tmpfs", 0)))
done()
