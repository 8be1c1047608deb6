"""Processes: signal, ptrace or read the memory of the daemon, its guardian, another agent.

argv JSON: "victims" {label: host pid}; "broad" adds kill(-1, 0), a scan of
every pid in /proc, and ptrace of the agent's own child.

In its own PID namespace the agent cannot name any process outside it: the
host's pids do not exist there (ESRCH), pidfd_open finds nothing, and the
seccomp filter refuses ptrace and process_vm_readv outright, even on the
agent's own child. kill(-1, 0) asks the kernel whether any process other
than itself and init could be signalled at all.
"""
import ctypes
import os
import signal
import time

from escapelib import Blocked, attempt, done, fact, syscall, targets

t = targets()
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206


def kill(pid, sig):
    return lambda: os.kill(pid, sig)


def pidfd_kill(pid):
    def go():
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        return "signalled"
    return go


def ptrace(request, pid):
    return lambda: syscall("ptrace", request, pid, 0, 0)


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vm_read(pid):
    """process_vm_readv at an address that is most likely unmapped.

    Permission is checked before the address: EFAULT means the call got
    through (counted as SUCCEEDED by attempt()), EPERM/ESRCH means refused.
    """
    def go():
        buf = ctypes.create_string_buffer(8)
        local = IOVec(ctypes.cast(buf, ctypes.c_void_p), 8)
        remote = IOVec(0x10000, 8)
        return syscall("process_vm_readv", pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return go


def ancestors():
    """This process and its ancestors as seen here: the sandbox's own plumbing."""
    chain, pid = set(), os.getpid()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return chain


def scan():
    """Every pid listed in /proc that kill(pid, 0) may reach, ancestors aside."""
    mine = ancestors()
    reachable = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine:
            try:
                os.kill(int(name), 0)
                reachable.append(name)
            except OSError:
                pass
    if reachable:
        return "reachable-" + ",".join(reachable[:20])
    raise Blocked("none-reachable")


def trace_own_child():
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    try:
        return syscall("ptrace", PTRACE_SEIZE, child, 0, 0)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


fact("own-pid", os.getpid())
fact("visible-pids", len([p for p in os.listdir("/proc") if p.isdigit()]))
for who, pid in t["victims"].items():
    attempt(f"{who}:kill-0", kill(pid, 0))
    attempt(f"{who}:SIGSTOP", kill(pid, signal.SIGSTOP))
    attempt(f"{who}:SIGKILL", kill(pid, signal.SIGKILL))
    attempt(f"{who}:pidfd-SIGKILL", pidfd_kill(pid))
    attempt(f"{who}:ptrace-attach", ptrace(PTRACE_ATTACH, pid))
    attempt(f"{who}:ptrace-seize", ptrace(PTRACE_SEIZE, pid))
    attempt(f"{who}:process_vm_readv", vm_read(pid))
    attempt(f"{who}:proc-mem", lambda p=pid: os.open(f"/proc/{p}/mem", os.O_RDONLY))
    attempt(f"{who}:proc-environ", lambda p=pid: os.open(f"/proc/{p}/environ", os.O_RDONLY))
if t.get("broad"):
    attempt("any-process:kill(-1,0)", kill(-1, 0))
    attempt("any-process:proc-scan", scan)
    attempt("own-child:ptrace-seize", trace_own_child)
done()
