"""Shared by the escape programs: try things, print one machine-readable line each.

Every program takes one argument, a JSON object of targets the test chose
(pids, paths, ports, a tag for file names), and prints lines:

    attempt NAME BLOCKED WHY      the kernel or the sandbox refused (an errno name, or a word)
    attempt NAME SUCCEEDED WHAT   it worked: an escape, unless the test's host-side check
                                  proves it stayed inside the sandbox
    attempt NAME ERROR WHAT       the attempt itself broke (a bug here, never "contained")
    fact NAME VALUE               something observed, for the test to judge
    done                          every attempt was made

Standard library only: the programs run as the unprivileged agent on
/usr/bin/python3, with no access to the test's virtualenv.
"""

import contextlib
import ctypes
import errno
import json
import os
import select
import socket
import sys
import time

# errno values that mean "refused": by permissions, by seccomp, by the
# absence of the thing (hidden paths, pids of another namespace).
REFUSALS = frozenset({errno.EPERM, errno.EACCES, errno.ENOENT, errno.ESRCH, errno.ENOSYS,
                      errno.EROFS, errno.ENOTDIR, errno.ENXIO, errno.ENODEV,
                      errno.EAFNOSUPPORT, errno.ECONNREFUSED, errno.ENETUNREACH,
                      errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.ENOSPC, errno.EDQUOT,
                      errno.EAGAIN, errno.EFBIG, errno.EOPNOTSUPP})

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# System call numbers (asm/unistd_64.h); Python 3.11's os module lacks most of these.
_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "mount": 165, "unshare": 272, "setns": 308,
    "clone": 56, "clone3": 435, "pivot_root": 155, "open_tree": 428, "fsopen": 430,
    "keyctl": 250, "add_key": 248, "bpf": 321, "perf_event_open": 298, "io_uring_setup": 425,
    "userfaultfd": 323, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "kexec_load": 246, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "reboot": 169, "sethostname": 170, "swapon": 167, "iopl": 172, "acct": 163,
}
_AARCH64 = {
    "ptrace": 117, "process_vm_readv": 270, "mount": 40, "unshare": 97, "setns": 268,
    "clone": 220, "clone3": 435, "pivot_root": 41, "open_tree": 428, "fsopen": 430,
    "keyctl": 219, "add_key": 217, "bpf": 280, "perf_event_open": 241, "io_uring_setup": 425,
    "userfaultfd": 282, "name_to_handle_at": 264, "open_by_handle_at": 265,
    "kexec_load": 104, "init_module": 105, "finit_module": 273, "delete_module": 106,
    "reboot": 142, "sethostname": 161, "swapon": 224, "acct": 89,
}
NR = _AARCH64 if os.uname().machine == "aarch64" else _X86_64


class Blocked(Exception):
    """Raised by an attempt that was refused without an errno (e.g. a program said no)."""


def targets():
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


def _word(text):
    return "-".join(str(text).split())[:200] or "-"


def report(name, outcome, why):
    print(f"attempt {_word(name)} {outcome} {_word(why)}", flush=True)


def fact(name, value):
    print(f"fact {_word(name)} {_word(value)}", flush=True)


def done():
    """Say every attempt was made, then stay alive (bounded): the test ends this agent."""
    print("done", flush=True)
    time.sleep(600)


def errname(code):
    return errno.errorcode.get(code, str(code))


def attempt(name, fn, refused=REFUSALS):
    """Run fn(); print how it went. fn's return value is the SUCCEEDED detail.

    An OSError whose errno is in `refused` is a refusal; any other errno means
    the call got past the permission checks (e.g. EINVAL on deliberately bad
    arguments), which counts as SUCCEEDED.
    """
    try:
        detail = fn()
    except Blocked as why:
        report(name, "BLOCKED", why)
    except OSError as err:
        if err.errno in refused:
            report(name, "BLOCKED", errname(err.errno))
        else:
            report(name, "SUCCEEDED", f"reached-{errname(err.errno)}")
    except Exception as err:  # reported as ERROR: the test fails on it
        report(name, "ERROR", f"{type(err).__name__}:{err}")
    else:
        report(name, "SUCCEEDED", detail if detail is not None else "ok")


def reading(path, dir_fd=None):
    """An attempt that opens path (relative to dir_fd) and reads up to 64 bytes."""
    def go():
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
        try:
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        return f"read-{len(data)}-bytes"
    return go


def new_socket(family, kind, proto=0):
    """An attempt that creates a socket(family, kind, proto) and closes it."""
    def go():
        socket.socket(family, kind, proto).close()
        return "created"
    return go


def syscall(name, *args):
    """The raw system call `name` (a key of NR); raises OSError on -1. Ints go as longs."""
    nr = NR.get(name)
    if nr is None:
        raise OSError(38, f"no {name} on {os.uname().machine}")  # ENOSYS
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *cargs)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def hold():
    """Stay alive, doing nothing, until the test kills the agent (bounded)."""
    time.sleep(600)
    os._exit(0)


def in_child(fn, timeout=10.0, keep=False):
    """Run fn() in a forked child and return what it returned (a short str).

    For attempts that would change this process for good (unshare, setns):
    the child reports through a pipe and exits; OSError and Blocked cross
    over as themselves. keep: the child stays alive after reporting (see
    hold()), so that the host can read from /proc what the attempt left it
    with (its namespaces, its mounts), whatever this program says.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            msg = "ok " + str(fn() or "ok")
        except Blocked as why:
            msg = f"blocked {why}"
        except OSError as err:
            msg = f"errno {err.errno}"
        except BaseException as err:  # reported, never raised in the child
            msg = f"error {type(err).__name__}"
        os.write(w, msg.encode()[:500])
        if keep:
            hold()
        os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], timeout)
    data = os.read(r, 600).decode() if ready else "error timeout"
    os.close(r)
    if not keep:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    kind, _, rest = data.partition(" ")
    if kind == "errno":
        raise OSError(int(rest), os.strerror(int(rest)))
    if kind == "blocked":
        raise Blocked(rest)
    if kind != "ok":
        raise RuntimeError(f"child {rest or 'died'}")
    return rest
