"""An allowlist agent's network namespace: made by the daemon, entered by the agent.

The daemon, not bwrap, creates it: a short-lived thread unshares its own
network namespace (unshare(2) with CLONE_NEWNET is allowed in a threaded
process and changes only the calling thread), configures it, creates the
sockets agentd serves inside it, and switches back. The namespace is owned
by the initial user namespace, so the agent, which runs without capabilities
in bwrap's child user namespace, can never change its routes or rules
(user_namespaces(7): capabilities count only in namespaces a user namespace
owns). The launch shim enters it by setns(2) before exec'ing bwrap, which
is then given no --unshare-net.

Inside: ``lo`` and nothing else; the default routes point at ``lo`` so that
a connect to any address gets as far as netfilter (with no route, connect(2)
fails with ENETUNREACH before any hook runs); nftables redirects every TCP
connection that is not to the agent's own loopback to agentd's capture
listener, every DNS query (UDP or TCP, to any server, loopback included:
a resolv.conf naming 127.0.0.53 must not escape the resolver) to agentd's
resolver, and drops everything else. Nothing can leave the namespace except
through a socket the daemon holds: there is no interface to leave by.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from daemon import children
from daemon.egress.capture import original_dst

CLONE_NEWNET = 0x40000000
CAPTURE_PORT = 15001
PROXY_PORT = 3128
DNS_PORT = 53
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
# TEST-NET-1 (RFC 5737) and the IPv6 documentation prefix (RFC 3849): never
# routed anywhere, so a probe to them can only be answered by the capture.
PROBE_V4 = "192.0.2.1"
PROBE_V6 = "2001:db8::1"
PROBE_PORT = 9
_SETUP_TIMEOUT_S = 15.0
_PROBE_TIMEOUT_S = 5.0
_SEARCH = "/usr/sbin:/sbin:/usr/bin:/bin"

RULESET = f"""\
table inet agentd {{
  chain nat_out {{
    type nat hook output priority -100; policy accept;
    udp dport 53 redirect to :{DNS_PORT}
    tcp dport 53 redirect to :{CAPTURE_PORT}
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :{CAPTURE_PORT}
  }}
  chain filter_out {{
    type filter hook output priority 0; policy drop;
    ct state established,related accept
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
  }}
}}
"""
# iproute2 infers the family of each route from its prefix. The src: without
# it a connection leaves from 0.0.0.0, and the listener's replies to 0.0.0.0
# never arrive (the handshake completes, then every flow stalls).
_IP_BATCH = ("link set lo up\nroute add default dev lo src 127.0.0.1\n"
             "route add ::/0 dev lo src ::1\n")

T = TypeVar("T")


class NetnsError(Exception):
    """The namespace could not be made or did not behave; the message says which step."""


@dataclass
class AgentNet:
    """The namespace (by fd) and the sockets agentd serves in it, by role."""

    netns_fd: int
    inode: int
    fds: dict[str, int] = field(default_factory=dict)
    _closed: bool = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (*self.fds.values(), self.netns_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def tools() -> tuple[str, str]:
    """Paths of ip(8) and nft(8). Raises NetnsError naming the missing package."""
    ip = shutil.which("ip", path=_SEARCH)
    nft = shutil.which("nft", path=_SEARCH)
    if ip is None or nft is None:
        missing = " and ".join(p for p, t in (("iproute2", ip), ("nftables", nft)) if t is None)
        raise NetnsError(f"network = \"allowlist\" needs Debian's {missing} package")
    return ip, nft


def create() -> AgentNet:
    """Make, configure and probe a new namespace. Raises NetnsError."""
    ip, nft = tools()
    net = _on_thread(lambda libc: int(libc.unshare(CLONE_NEWNET)), "unshare(CLONE_NEWNET)",
                     lambda: _configure(ip, nft), AgentNet.close,
                     doing="setting up the network namespace")
    try:
        probe(net)
    except NetnsError:
        net.close()
        raise
    return net


def _configure(ip: str, nft: str) -> AgentNet:
    """On a thread that just unshared its namespace: routes, rules, agentd's sockets."""
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    net = AgentNet(netns_fd=fd, inode=os.fstat(fd).st_ino)
    try:
        # Children forked from this thread start in its namespace.
        _run([ip, "-batch", "-"], _IP_BATCH, "ip")
        _run([nft, "-f", "-"], RULESET, "nft")
        net.fds = _sockets()
    except BaseException:
        net.close()
        raise
    return net


def _on_thread(enter: Callable[[Any], int], entering: str, work: Callable[[], T],
               discard: Callable[[T], None], *, doing: str) -> T:
    """work() on a short-lived thread that first entered a network namespace.

    enter(libc) unshares or joins one (0 on success, as the system calls
    return); the thread goes back to the daemon's own namespace before it
    ends, so nothing else ever runs in the agent's. If the caller stops
    waiting after _SETUP_TIMEOUT_S, the thread discards what work() made
    whenever it finishes. Raises NetnsError.
    """
    result: list[T | NetnsError] = []
    lock = threading.Lock()

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if enter(libc) != 0:
                raise NetnsError(f"{entering}: {os.strerror(ctypes.get_errno())}")
            made = work()
            with lock:
                if result:  # the caller gave up
                    discard(made)
                else:
                    result.append(made)
        except BaseException as err:  # handed to the caller, whatever it is
            with lock:
                result.append(err if isinstance(err, NetnsError) else NetnsError(str(err)))
        finally:
            libc.setns(home, CLONE_NEWNET)
            os.close(home)

    worker = threading.Thread(target=run, name="agentd-netns", daemon=True)
    worker.start()
    worker.join(_SETUP_TIMEOUT_S)
    with lock:
        if not result:
            result.append(NetnsError("abandoned"))
            raise NetnsError(f"{doing} took over {_SETUP_TIMEOUT_S:.0f} s")
    out = result[0]
    if isinstance(out, NetnsError):
        raise out
    return out


def _run(argv: list[str], stdin: str, what: str) -> None:
    proc = children.spawn(lambda: subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        close_fds=True, env={"PATH": _SEARCH}))
    try:
        _, err = proc.communicate(stdin.encode(), timeout=_SETUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise NetnsError(f"{what} did not finish configuring the namespace") from None
    if proc.returncode != 0:
        said = "; ".join(err.decode("utf-8", "replace").split("\n")).strip("; ")
        raise NetnsError(f"{what} failed to configure the namespace: "
                         f"{said[:400] if said else f'exit {proc.returncode}'}")


def _sockets() -> dict[str, int]:
    made: dict[str, socket.socket] = {}
    try:
        made["tcp4"] = _listener(socket.AF_INET, "127.0.0.1", CAPTURE_PORT)
        made["tcp6"] = _listener(socket.AF_INET6, "::1", CAPTURE_PORT)
        made["dns4"] = _udp(socket.AF_INET, "127.0.0.1", DNS_PORT)
        made["dns6"] = _udp(socket.AF_INET6, "::1", DNS_PORT)
        made["proxy"] = _listener(socket.AF_INET, "127.0.0.1", PROXY_PORT)
    except OSError:
        for s in made.values():
            s.close()
        raise
    return {role: s.detach() for role, s in made.items()}


def _listener(family: int, host: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(socket.SOMAXCONN)
    return s


def _udp(family: int, host: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    return s


def probe(net: AgentNet) -> None:
    """Exercise the capture before any agent runs in the namespace. Raises NetnsError.

    Connections to TEST-NET addresses, from sockets made inside the namespace,
    must arrive at the capture listeners with their original destination; a
    DNS datagram to a TEST-NET server must arrive at the resolver's socket;
    any other datagram must be refused by the filter. The daemon takes each
    probe off the listener itself, so the egress service never sees one.
    """
    # Sockets stay in the namespace they were made in: made on a thread in it.
    made = _on_thread(lambda libc: int(libc.setns(net.netns_fd, CLONE_NEWNET)), "setns",
                      _probe_sockets, _close_all, doing="entering the network namespace")
    tcp4, tcp6, udp = made
    try:
        _probe_tcp(tcp4, (PROBE_V4, PROBE_PORT), net.fds["tcp4"])
        _probe_tcp(tcp6, (PROBE_V6, PROBE_PORT), net.fds["tcp6"])
        udp.settimeout(_PROBE_TIMEOUT_S)
        udp.sendto(b"agentd-probe", (PROBE_V4, DNS_PORT))
        if not _readable(net.fds["dns4"]):
            raise NetnsError("a DNS query from the namespace did not reach agentd's resolver")
        with contextlib.suppress(BlockingIOError):
            os.read(net.fds["dns4"], 64)
        try:
            udp.sendto(b"agentd-probe", (PROBE_V4, PROBE_PORT))
        except PermissionError:
            pass  # EPERM: the filter chain's drop
        else:
            raise NetnsError("a UDP datagram to 192.0.2.1:9 was not dropped by the filter")
    except OSError as err:
        raise NetnsError(f"probing the namespace's capture: {err.strerror or err}") from err
    finally:
        _close_all(made)


def _probe_tcp(client: socket.socket, dst: tuple[str, int], listen_fd: int) -> None:
    client.settimeout(_PROBE_TIMEOUT_S)
    try:
        client.connect(dst)
    except OSError as err:
        raise NetnsError(f"a connection to {dst[0]}:{dst[1]} was not captured "
                         f"({err.strerror or err})") from err
    if not _readable(listen_fd):
        raise NetnsError(f"a connection to {dst[0]}:{dst[1]} did not reach the capture listener")
    with socket.socket(fileno=os.dup(listen_fd)) as listener:
        conn, _ = listener.accept()
    with conn:
        addr, port = original_dst(conn)
    if (str(addr), port) != (dst[0], dst[1]):
        raise NetnsError(f"the capture listener saw {addr}:{port} as the original destination "
                         f"of a connection to {dst[0]}:{dst[1]}")


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    while True:
        try:
            return bool(p.poll(_PROBE_TIMEOUT_S * 1000))
        except InterruptedError:
            continue


def _probe_sockets() -> tuple[socket.socket, ...]:
    kinds = ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_STREAM),
             (socket.AF_INET, socket.SOCK_DGRAM))
    made: list[socket.socket] = []
    try:
        for family, kind in kinds:
            made.append(socket.socket(family, kind | socket.SOCK_CLOEXEC))
    except OSError:
        _close_all(tuple(made))
        raise
    return tuple(made)


def _close_all(socks: tuple[socket.socket, ...]) -> None:
    for s in socks:
        s.close()
