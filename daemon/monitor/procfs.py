"""Reading agents' processes from /proc: command lines, executables, fds, sockets.

The one place the monitor touches /proc (cgroupfs goes through
daemon.cgroups.fs). Every process read may race with the process's exit, or
meet a process the daemon may not inspect (another user namespace), so each
reader returns None or an empty result for ENOENT, ESRCH, EACCES and EPERM
instead of raising: a process that vanished mid-read is simply not counted.
Any other OSError propagates.

Reads use os.open/os.read on bytes paths and skip Python's buffered text
layer: a sample of 100 agents makes thousands of these calls.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Errors meaning "this process is gone or not ours to read".
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM})

CMDLINE_MAX = 200
_O_ACCMODE = 0o3
# include/net/tcp_states.h: TCP_SYN_SENT = 2, TCP_LISTEN = 10 (0A in /proc/net/tcp).
TCP_SYN_SENT = 0x02
TCP_LISTEN = 0x0A
NET_TABLES = ("tcp", "tcp6", "udp", "udp6")


def _gone(err: OSError) -> bool:
    return err.errno in _GONE


def read_bytes(path: str, limit: int = 1 << 20) -> bytes | None:
    """Read a /proc file whole (up to limit); None if the process is gone or not readable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        if _gone(err):
            return None
        raise
    try:
        chunks = []
        size = 0
        while size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as err:
        # ESRCH from read(2) on a process that exited after the open.
        if _gone(err):
            return None
        raise
    finally:
        os.close(fd)


def readlink(path: str) -> str | None:
    """readlink(2) of a /proc link; None if the process or fd is gone or not readable."""
    try:
        return os.readlink(path)
    except OSError as err:
        if _gone(err):
            return None
        raise


def cmdline(pid: int) -> str:
    """The process's command line, NULs as spaces, at most CMDLINE_MAX characters.

    proc(5): /proc/PID/cmdline holds argv NUL-separated, and is empty for a
    zombie; then "[comm]" is shown, as ps(1) does. "" if the process is gone.
    """
    raw = read_bytes(f"/proc/{pid}/cmdline", limit=4 * CMDLINE_MAX)
    if raw is None:
        return ""
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    if not text:
        comm = read_bytes(f"/proc/{pid}/comm")
        if not comm:
            return ""
        text = f"[{comm.strip().decode('utf-8', 'replace')}]"
    return text[:CMDLINE_MAX]


def exe(pid: int) -> str | None:
    """The path of the program the process runs (/proc/PID/exe), as the kernel resolved it."""
    return readlink(f"/proc/{pid}/exe")


def netns(pid: int) -> str | None:
    """The process's network namespace, e.g. "net:[4026531840]" (namespaces(7))."""
    return readlink(f"/proc/{pid}/ns/net")


class Prefixes:
    """under() for a fixed set of prefixes, at the cost of one str.startswith per path."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self.paths = tuple(prefixes)
        self._exact = frozenset(self.paths)
        self._dirs = tuple(p.rstrip("/") + "/" for p in self.paths)

    def covers(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._dirs)


@dataclass
class Fds:
    """What one process holds open: socket inodes and paths open for writing."""

    sockets: set[int]
    written: list[str]


def fds(pid: int, allowed: Prefixes) -> Fds:
    """Socket inodes and written files among the process's open fds.

    proc(5): a socket fd's link reads "socket:[INODE]"; a file's, its path
    as the kernel resolves it (absolute, no "..", " (deleted)" appended once
    unlinked). Only path fds outside the allowed prefixes pay for a read of
    /proc/PID/fdinfo/N, whose "flags:" line (octal) holds the open(2)
    access mode. An fd closed between listing and reading is skipped.
    """
    out = Fds(set(), [])
    base = f"/proc/{pid}/fd/"
    try:
        names = os.listdir(base)
    except OSError as err:
        if _gone(err):
            return out
        raise
    for name in names:
        target = readlink(base + name)
        if target is None:
            continue
        if target.startswith("socket:["):
            out.sockets.add(int(target[8:-1]))
        elif target.startswith("/") and not allowed.covers(target):
            flags = _fd_flags(pid, name)
            if flags is not None and flags & _O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                out.written.append(target)
    return out


def _fd_flags(pid: int, fd: str) -> int | None:
    raw = read_bytes(f"/proc/{pid}/fdinfo/{fd}")
    if raw is None:
        return None
    for line in raw.splitlines():
        if line.startswith(b"flags:"):
            return int(line.split()[1], 8)
    return None


# ---------------------------------------------------------- /proc/net tables
@dataclass(frozen=True)
class NetEntry:
    """One row of /proc/net/{tcp,tcp6,udp,udp6}; addresses decoded when asked for.

    A sweep reads the whole table of a namespace (the host's may hold
    thousands of rows) but needs the few rows of its agents' sockets.
    """

    proto: str  # "tcp" or "udp"
    state: int
    inode: int
    local_hex: str
    remote_hex: str

    @property
    def local(self) -> str:
        return decode_endpoint(self.local_hex)

    @property
    def remote(self) -> str:
        """ "ip:port" or "[ipv6]:port"; "" when not connected."""
        return decode_endpoint(self.remote_hex)


def net_tables(pid: int) -> dict[int, NetEntry]:
    """Every inet socket of the process's network namespace, by inode.

    /proc/PID/net shows the namespace of PID, not the reader's: an agent in
    its own namespace is seen as it sees itself. Sockets with inode 0
    (connections not yet accepted, TIME_WAIT) belong to nobody and are left out.
    """
    out: dict[int, NetEntry] = {}
    for table in NET_TABLES:
        raw = read_bytes(f"/proc/{pid}/net/{table}", limit=64 << 20)
        if raw:
            out.update((e.inode, e) for e in parse_net_table(raw, table) if e.inode)
    return out


def parse_net_table(raw: bytes, table: str) -> list[NetEntry]:
    """Parse the text of /proc/net/tcp, tcp6, udp or udp6 (proc(5)).

    Columns: sl, local_address, rem_address, st, tx_queue:rx_queue, tr:tm->when,
    retrnsmt, uid, timeout, inode, ... Addresses are "HEXADDR:HEXPORT"; the
    port is in host order, the address is the in-kernel (network order)
    bytes printed as native 32-bit words (see _decode_address). Rows that do
    not parse are skipped; addresses are checked when decoded.
    """
    proto = table.rstrip("6")
    out = []
    for line in raw.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        try:
            out.append(NetEntry(proto=proto, state=int(cols[3], 16), inode=int(cols[9]),
                                local_hex=cols[1].decode("ascii"),
                                remote_hex=cols[2].decode("ascii")))
        except ValueError:
            continue
    return out


def decode_endpoint(text: str) -> str:
    """ "0100007F:1F90" -> "127.0.0.1:8080"; IPv6 as "[::1]:8080"; "" for address 0, port 0.

    IPv4-mapped IPv6 addresses are shown as IPv4: the peer is an IPv4 host.
    Raises ValueError for malformed text.
    """
    hexaddr, _, hexport = text.partition(":")
    port = int(hexport, 16)
    addr = _decode_address(hexaddr)
    if port == 0 and addr.packed == bytes(len(addr.packed)):
        return ""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return f"{addr.ipv4_mapped}:{port}"
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def _decode_address(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints the address as %08X of each 32-bit word in native
    # byte order (net/ipv4/tcp_ipv4.c get_tcp4_sock, net/ipv6/tcp_ipv6.c
    # get_tcp6_sock): on a little-endian host every 4-byte group is reversed.
    raw = bytes.fromhex(hexaddr)
    if len(raw) not in (4, 16):
        raise ValueError(f"not an IPv4 or IPv6 address: {hexaddr!r}")
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    return ipaddress.IPv6Address(raw)


def connections(entries: Mapping[int, NetEntry],
                inodes: Iterable[int]) -> tuple[int, list[str]]:
    """Connections among the given socket inodes, and their remote addresses (sorted, unique).

    A TCP socket counts unless it listens or has no peer yet (created or
    bound, not connected); SYN_SENT counts, as a connection attempt. A UDP
    socket counts once connect(2) gave it a peer; datagrams sent with
    sendto(2) from an unconnected socket leave no trace here.
    """
    count = 0
    remotes: set[str] = set()
    for inode in inodes:
        e = entries.get(inode)
        if e is None or (e.proto == "tcp" and e.state == TCP_LISTEN):
            continue
        try:
            remote = e.remote
        except ValueError:
            continue  # not what the kernel writes; nothing to report
        if remote:
            count += 1
            remotes.add(remote)
    return count, sorted(remotes)
