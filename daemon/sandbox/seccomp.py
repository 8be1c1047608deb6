"""The agents' seccomp filter: built by libseccomp in the daemon, handed to bwrap as BPF.

Default allow, and EPERM for what an agent never needs (seccomp(2)): a
denied call fails politely instead of killing the program, so a tool that
probes for, say, perf_event_open falls back instead of crashing. The filter
is compiled once, here, by the daemon (root, trusted code) and exported as
classic BPF; bwrap loads it with `--seccomp FD` just before it execs the
agent (bwrap(1)), as flatpak does. Nothing in the sandbox can choose it.

Namespace creation is denied by flag: clone(2) and unshare(2) with a
CLONE_NEW* bit fail, plain fork and threads do not. clone3(2) passes its
flags in memory a filter cannot read, so it fails with ENOSYS, which makes
glibc (2.34+) fall back to clone(2) where the flags are visible; the same
recipe as Docker's and flatpak's profiles.
"""

from __future__ import annotations

import ctypes.util
import errno
import fcntl
import functools
import os
from types import ModuleType

from daemon.errors import LaunchFailed

_SONAME = "libseccomp.so.2"

# Linux's CLONE_NEW* flags (sched.h): one rule per bit, since a seccomp rule
# can test a masked argument for equality but not "any of these bits".
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (CLONE_NEWTIME, CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC,
                   CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET)
PER_LINUX = 0

# Denied outright with EPERM, grouped by why an agent never needs them.
DENIED: dict[str, tuple[str, ...]] = {
    "debugging other processes": ("ptrace", "process_vm_readv", "process_vm_writev",
                                  "pidfd_getfd", "kcmp"),
    "mounts and roots": ("mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
                         "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr"),
    "namespaces": ("setns",),
    "kernel keyring": ("keyctl", "add_key", "request_key"),
    "kernel programs and tracing": ("bpf", "perf_event_open", "lookup_dcookie"),
    "kernel images and modules": ("kexec_load", "kexec_file_load", "init_module",
                                  "finit_module", "delete_module", "create_module"),
    "the machine": ("reboot", "swapon", "swapoff", "acct", "quotactl", "vhangup",
                    "sethostname", "setdomainname", "syslog"),
    "the clock": ("settimeofday", "clock_settime", "adjtimex", "clock_adjtime"),
    "file handles": ("open_by_handle_at", "name_to_handle_at"),
    "fault handling": ("userfaultfd",),
    "port I/O": ("iopl", "ioperm"),
    "io_uring (bypasses this filter for the I/O it performs)": (
        "io_uring_setup", "io_uring_enter", "io_uring_register"),
    "old interfaces": ("uselib", "nfsservctl", "_sysctl"),
}


def denied_names() -> list[str]:
    """Every syscall the filter refuses whatever its arguments, plus the conditional ones."""
    names = [n for group in DENIED.values() for n in group]
    return sorted({*names, "clone (namespace flags)", "unshare (namespace flags)",
                   "clone3 (ENOSYS)", "personality (other than PER_LINUX)"})


@functools.cache
def _library() -> ModuleType:
    """pyseccomp, loaded so that it finds libseccomp even without ldconfig's cache.

    pyseccomp looks the library up with ctypes.util.find_library, which
    reads /etc/ld.so.cache; a volatile /etc (systemd-nspawn --volatile, an
    initrd) has none, although dlopen(3) still finds the soname in the
    system directories. Raises LaunchFailed when it cannot be loaded.
    """
    find = ctypes.util.find_library
    try:
        if find("seccomp") is None:
            ctypes.util.find_library = lambda name: _SONAME if name == "seccomp" else find(name)
        import pyseccomp  # noqa: PLC0415 - loaded on first use, see above

        module: ModuleType = pyseccomp
        return module
    except (ImportError, OSError, RuntimeError) as err:
        raise LaunchFailed(f"cannot load libseccomp ({_SONAME}, package libseccomp2) "
                           f"through pyseccomp: {err}") from err
    finally:
        ctypes.util.find_library = find


def _resolvable(name: str) -> bool:
    sc = _library()
    # __NR_SCMP_ERROR (-1) for a name this architecture does not have
    # (create_module, _sysctl...): nothing to deny there.
    return int(sc.resolve_syscall(sc.Arch.NATIVE, name)) >= 0


# socket(2) families an agent never gets. AF_VSOCK reaches the hypervisor's
# services, and no network namespace confines it (vsock(7)). AF_UNIX, when
# the profile says network = "none": a read-only view of the host does not
# stop connect(2) to a socket file (unix(7)), so any world-connectable
# service socket anywhere in that view would be a channel out; socketpair(2)
# stays allowed for a program's own use.
AF_UNIX = 1
AF_VSOCK = 40


@functools.cache
def bpf(deny_unix: bool = True) -> bytes:
    """The filter as classic BPF for the native architecture. Raises LaunchFailed.

    deny_unix: also refuse socket(AF_UNIX, ...) (profiles with network "none").
    """
    sc = _library()
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        # A syscall made through another ABI (int 0x80, x32) would bypass
        # rules written for the native one: refuse them all.
        f.set_attr(sc.Attr.ACT_BADARCH, sc.ERRNO(errno.ENOSYS))
        eperm = sc.ERRNO(errno.EPERM)
        for group in DENIED.values():
            for name in group:
                if _resolvable(name):
                    f.add_rule(eperm, name)
        for name in ("clone", "unshare"):
            # clone's flags are argument 0 on x86-64 and arm64 (not on s390).
            for flag in NAMESPACE_FLAGS:
                f.add_rule(eperm, name, sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(eperm, "personality", sc.Arg(0, sc.NE, PER_LINUX))
        for family in (AF_VSOCK, AF_UNIX) if deny_unix else (AF_VSOCK,):
            f.add_rule(eperm, "socket", sc.Arg(0, sc.EQ, family))
        fd = os.memfd_create("agentd-seccomp-build", os.MFD_CLOEXEC)
        try:
            with os.fdopen(fd, "w+b", closefd=False) as out:
                f.export_bpf(out)
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as err:
        raise LaunchFailed(f"cannot build the seccomp filter with libseccomp: {err}") from err
    if not data or len(data) % 8:
        raise LaunchFailed(f"libseccomp exported {len(data)} bytes of BPF, not whole instructions")
    return data


def bpf_fd(deny_unix: bool = True) -> int:
    """A sealed memfd holding the filter, at offset 0 (close-on-exec: pass it with pass_fds).

    One per launch: bwrap reads it to the end, and a shared file offset
    would leave the next agent an empty read. Sealed (memfd_create(2),
    F_SEAL_WRITE and friends) so nothing holding it can change the filter
    after the daemon wrote it. The caller closes it once the shim has started.
    """
    data = bpf(deny_unix)
    fd = os.memfd_create("agentd-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as err:
        os.close(fd)
        raise LaunchFailed(f"cannot hand the seccomp filter over: {err.strerror}") from err
    return fd
