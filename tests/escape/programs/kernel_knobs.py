"""Kernel knobs: /proc/sysrq-trigger, /proc/sys, the hostname, the OOM score.

/proc/sysrq-trigger and /proc/sys belong to root, and the sandbox's /proc
keeps them read-only. Every write here is harmless if it lands: sysrq "h"
only prints help to the kernel log, and each sysctl gets the value it
already has; the attempt is what counts. Lowering oom_score_adj needs
CAP_SYS_RESOURCE: an agent immune to the OOM killer would push it onto
others.
"""
import os
import socket

from escapelib import attempt, done, syscall

SYSCTLS = ("kernel/core_pattern", "kernel/modprobe", "kernel/hostname", "kernel/domainname",
           "kernel/sysrq", "kernel/panic", "vm/overcommit_memory", "net/ipv4/ip_forward",
           "fs/suid_dumpable", "kernel/unprivileged_bpf_disabled")


def write(path, data):
    def go():
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return "written"
    return go


def rewrite(path):
    """Write back what the file already says (a file that cannot be read is not written)."""
    def go():
        with open(path, "rb") as f:
            current = f.read()
        return write(path, current)()
    return go


attempt("sysrq-trigger", write("/proc/sysrq-trigger", b"h"))
for name in SYSCTLS:
    attempt(f"sysctl:{name}", rewrite(f"/proc/sys/{name}"))
attempt("sethostname", lambda: syscall("sethostname", socket.gethostname().encode(),
                                        len(socket.gethostname().encode())))
attempt("oom_score_adj:-1000", write("/proc/self/oom_score_adj", b"-1000"))
attempt("sys-kernel-uevent_helper", rewrite("/sys/kernel/uevent_helper"))
attempt("sys-power-state", lambda: os.close(os.open("/sys/power/state", os.O_WRONLY)))
done()
