"""Kernel attack surface: host devices, TIOCSTI, mknod, and syscalls the sandbox denies.

Kernel memory (/proc/kcore, /dev/mem), disks and other host devices must
not open: the sandbox gives a minimal /dev, nodev on the host view. TIOCSTI
(typing into a terminal) needs the agent's own terminal, which it has none
of. The rest are system calls the seccomp filter refuses (keyctl, bpf,
perf_event_open, io_uring, userfaultfd, module loading, kexec, reboot...)
or that need capabilities the agent lacks (mknod, open_by_handle_at: the
"shocker" container escape). Arguments are deliberately invalid where that
is possible: an errno other than EPERM/EACCES/ENOSYS means the call got
past the permission checks, and counts as SUCCEEDED.
"""
import ctypes
import errno
import fcntl
import os
import resource
import stat
import termios

from escapelib import attempt, done, syscall, targets

t = targets()
# Refused only by privilege or by the filter: ENOENT, EINVAL... mean "got through".
PRIV = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})


def open_device(path):
    def go():
        for flags in (os.O_RDONLY, os.O_WRONLY):
            try:
                os.close(os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY))
                return "opened-" + ("read" if flags == os.O_RDONLY else "write")
            except OSError as err:
                last = err
        raise last
    return go


def tiocsti(fd_or_path):
    def go():
        fd = fd_or_path if isinstance(fd_or_path, int) else os.open(fd_or_path, os.O_RDWR)
        fcntl.ioctl(fd, termios.TIOCSTI, b"\0")
        return "injected"
    return go


def mknod(name, mode, major, minor):
    return lambda: os.mknod(os.path.join(os.getcwd(), f"{t['tag']}-{name}"),
                            mode | 0o600, os.makedev(major, minor))


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def shocker():
    """open_by_handle_at(2) with a forged handle (inode 2) on "/": needs CAP_DAC_READ_SEARCH.

    The forged handle need not be valid: permission is checked first, so
    ESTALE or EINVAL would mean the call got through.
    """
    handle = FileHandle(handle_bytes=8, handle_type=1)  # FILEID_INO32_GEN: inode, generation
    handle.f_handle[0] = 2
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return syscall("open_by_handle_at", root, ctypes.byref(handle), os.O_RDONLY)
    finally:
        os.close(root)


def bpf_map():
    attr = (ctypes.c_uint32 * 30)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    return syscall("bpf", 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE


def perf_event():
    attr = (ctypes.c_uint8 * 128)()
    # type PERF_TYPE_SOFTWARE (1), size 128, config CPU_CLOCK (0), exclude_kernel|exclude_hv
    ctypes.memmove(attr, (ctypes.c_uint32 * 2)(1, 128), 8)
    ctypes.memmove(ctypes.byref(attr, 40), (ctypes.c_uint64 * 1)(0b1100000), 8)
    return syscall("perf_event_open", ctypes.byref(attr), 0, -1, -1, 0)


def io_uring():
    params = (ctypes.c_uint8 * 120)()
    return syscall("io_uring_setup", 1, ctypes.byref(params))


for path in t["devices"]:
    attempt(f"open-device:{path}", open_device(path))
attempt("tiocsti:/dev/tty", tiocsti("/dev/tty"), refused=PRIV | {errno.ENXIO, errno.ENOTTY})
for fd in (0, 1, 2):
    attempt(f"tiocsti:fd{fd}", tiocsti(fd), refused=PRIV | {errno.ENOTTY})
attempt("mknod:char-1:1-mem", mknod("mem", stat.S_IFCHR, 1, 1), refused=PRIV)
major, minor = t["root_disk"]
attempt(f"mknod:block-{major}:{minor}-host-disk", mknod("disk", stat.S_IFBLK, major, minor),
        refused=PRIV)
attempt("open_by_handle_at-shocker", shocker, refused=PRIV)
attempt("add_key", lambda: syscall("add_key", b"user", t["tag"].encode(), b"x", 1, -2),
        refused=PRIV)
attempt("keyctl-get-session-keyring", lambda: syscall("keyctl", 0, -3, 1), refused=PRIV)
attempt("bpf-map-create", bpf_map, refused=PRIV)
attempt("perf_event_open-self", perf_event, refused=PRIV)
attempt("io_uring_setup", io_uring, refused=PRIV)
attempt("userfaultfd-user-mode", lambda: syscall("userfaultfd", os.O_CLOEXEC | 1), refused=PRIV)
attempt("kexec_load-bad-flags", lambda: syscall("kexec_load", 0, 0, None, 0xDEAD0000),
        refused=PRIV)
attempt("init_module-null", lambda: syscall("init_module", None, 0, b""), refused=PRIV)
attempt("finit_module-bad-fd", lambda: syscall("finit_module", -1, b"", 0), refused=PRIV)
attempt("delete_module-missing", lambda: syscall("delete_module", b"agentd_none", 0o4000),
        refused=PRIV)
attempt("reboot-bad-magic", lambda: syscall("reboot", 0, 0, 0, None), refused=PRIV)
attempt("swapon-missing", lambda: syscall("swapon", b"/agentd-none", 0), refused=PRIV)
if os.uname().machine == "x86_64":
    attempt("iopl-3", lambda: syscall("iopl", 3), refused=PRIV)


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
    except ValueError as err:  # Python's word for EPERM here
        raise OSError(errno.EPERM, str(err)) from err
    return f"raised-to-{hard + 1}"


attempt("raise-rlimit-nofile", raise_nofile, refused=PRIV)
done()
