"""One agent's egress inside the service: its listeners, its resolver, its flows.

Every flow is decided before a byte goes upstream: where it was going
(SO_ORIGINAL_DST for captured flows, the request for the explicit proxy),
what the allowlist says of that name or address and port, which real
addresses the name was pinned to and whether those are private, and what
the client's first bytes say (daemon.egress.inspect). Then the bytes are
pumped with splice(2) until either side ends, a cut, or the byte cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.egress import dns, httphost, inspect, pump
from daemon.egress.allowlist import Allowlist, IPAddress, canonical_name
from daemon.egress.capture import original_dst
from daemon.egress.upstream import resolve_a

# Open flows per agent. Each holds at most 4 socket buffers (SOCKET_BUFFER,
# doubled by the kernel: socket(7)) and 2 pipes (pump.CHUNK): about 1.25 MiB,
# so an agent can make the service hold at most ~80 MiB of kernel memory.
FLOW_LIMIT = 64
FIRST_BYTES_GRACE_S = 2.0  # a silent client past this is taken for a server-first protocol
HANDSHAKE_TIMEOUT_S = 10.0  # first bytes / request head / upstream connect, each
MAX_DNS_TCP_MESSAGES = 64  # per DNS-over-TCP connection
# Socket buffers, both sides of every flow, set (which also turns autotuning
# off, tcp(7)): kernel memory an agent can make the service hold is then
# bounded by flows x buffers, not by the host's tcp_mem, and the service's
# memory is not charged to the agent's cgroup.
SOCKET_BUFFER = 128 * 1024
REASON_MAX = 512  # characters of a reason (agent bytes may be quoted in it)
DNS_CACHE_S = 30.0  # upstream answers reused this long (at most: the synthetic TTL)
DNS_CACHE_MAX = 4096
# The list, and what else is not a global unicast address (benchmark,
# documentation, multicast, reserved, broadcast): ipaddress's is_global
# decides beyond it (_private_ok).
PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "100.64.0.0/10", "0.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128", "::/128",
    "192.0.0.0/24", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4", "ff00::/8",
))
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

Via = Literal["capture", "proxy", "dns-tcp"]
Emit = Callable[[dict[str, Any]], None]


class Denied(Exception):
    """A flow refused, with the reason an on-call engineer reads."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


@dataclass(eq=False)  # identity: flows live in a set
class Flow:
    via: Via
    port: int = 0
    name: str | None = None
    addr: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    opened: bool = False


@dataclass(frozen=True)
class Settings:
    resolvers: list[tuple[str, int]]
    private_ok: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    inspector: inspect.Inspector = field(default_factory=inspect.SniHostInspector)


class AgentEgress:
    """The service's state for one agent; runs on the service's one event loop."""

    def __init__(self, agent_id: str, name: str, allow: Allowlist, *,
                 socks: dict[str, socket.socket], byte_cap: int, settings: Settings,
                 emit: Emit) -> None:
        self.id = agent_id
        self.name = name
        self.allow = allow
        self.socks = socks
        self.byte_cap = byte_cap
        self.bytes_used = 0
        self.settings = settings
        self._emit = emit
        self.table = dns.SyntheticTable()
        self._dns_cache: dict[str, tuple[float, asyncio.Future[list[ipaddress.IPv4Address]]]] = {}
        self.flows: set[Flow] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ life
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for role, sock in self.socks.items():
            if role in ("tcp4", "tcp6"):
                self._tasks.append(loop.create_task(self._accept(sock, "capture")))
            elif role == "proxy":
                self._tasks.append(loop.create_task(self._accept(sock, "proxy")))
            elif role in ("dns4", "dns6"):
                self._tasks.append(loop.create_task(self._udp_dns(sock)))

    def cut(self, *, empty: bool) -> None:
        """Close every flow now; empty=True also empties the allowlist."""
        if empty:
            self.allow = Allowlist()
        for flow in list(self.flows):
            if flow.task is not None:
                flow.task.cancel()

    def remove(self) -> None:
        self.cut(empty=True)
        for t in self._tasks:
            t.cancel()
        for sock in self.socks.values():
            sock.close()

    # ------------------------------------------------------------ events
    def _flow_event(self, flow: Flow, verdict: str, reason: str, phase: str) -> None:
        self._emit({
            "kind": "flow", "agent": self.id, "verdict": verdict, "reason": _short(reason),
            "name": flow.name, "addr": flow.addr, "port": flow.port, "via": flow.via,
            "phase": phase, "bytes_out": flow.bytes_out, "bytes_in": flow.bytes_in,
            "duration_s": round(time.monotonic() - flow.started, 6),
        })

    # ------------------------------------------------------------ accept
    async def _accept(self, listener: socket.socket, via: Via) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:
                # EMFILE and the like: back off rather than spin; the flow
                # limit normally keeps us far from it.
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            _buffers(conn)
            flow = Flow(via=via)
            if len(self.flows) >= FLOW_LIMIT:
                conn.close()
                self._flow_event(flow, "denied", f"flow limit ({FLOW_LIMIT}) reached", "close")
                continue
            self.flows.add(flow)
            flow.task = loop.create_task(self._run(flow, conn))

    async def _run(self, flow: Flow, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        reason = "closed"
        try:
            if flow.via == "proxy":
                upstream, first = await self._proxy_open(flow, conn)
            else:
                dst, port = original_dst(conn)
                flow.port = port
                if port == 53:
                    flow.via = "dns-tcp"
                    flow.addr = str(dst)
                    await self._dns_tcp(conn)
                    return
                upstream, first = await self._capture_open(flow, conn, dst, port)
            flow.opened = True
            self._flow_event(flow, "allowed", "in the allowlist", "open")
            if first:
                await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(upstream, first),
                                       HANDSHAKE_TIMEOUT_S)
                flow.bytes_out += len(first)
                self._spend(len(first))
            reason = await self._pump(flow, conn, upstream)
        except Denied as err:
            reason = str(err)
        except asyncio.CancelledError:
            # Not re-raised: this task is the flow's own, and its end is here.
            reason = self._cap_reason() if self._capped() else "cut"
        except (OSError, TimeoutError) as err:
            reason = f"connection error: {_why(err)}"
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()
            self.flows.discard(flow)
            if flow.via != "dns-tcp":
                self._flow_event(flow, "allowed" if flow.opened else "denied", reason, "close")

    # ------------------------------------------------------------ decisions
    def _capped(self) -> bool:
        return bool(self.byte_cap) and self.bytes_used >= self.byte_cap

    def _cap_reason(self) -> str:
        return f"byte cap of {_mib(self.byte_cap)} reached"

    def _spend(self, n: int) -> None:
        self.bytes_used += n
        if self._capped():
            self.cut(empty=False)

    def _name_ports(self, name: str, port: int) -> None:
        if self.allow.allows_name(name, port):
            return
        others = [e.text for e in self.allow.name_entries(name)]
        also = f" (it allows {', '.join(others)})" if others else ""
        raise Denied(f"{name}:{port} is not in the allowlist{also}")

    def _private_ok(self, addr: IPAddress) -> bool:
        a = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) and \
            addr.ipv4_mapped else addr
        if a.is_global and not any(a.version == n.version and a in n for n in PRIVATE):
            return True
        # A CIDR entry exempts a private address only if the entry lies
        # within private space itself: 0.0.0.0/0:443 must not reach the
        # host's loopback or a metadata service.
        named = any(e.network is not None and e.network.version == a.version
                    and a in e.network and not e.network.is_global
                    for e in self.allow.entries)
        return named or any(
            a.version == n.version and a in n for n in self.settings.private_ok)

    def _pick(self, name: str, pinned: tuple[ipaddress.IPv4Address, ...]) -> list[IPAddress]:
        ok: list[IPAddress] = [a for a in pinned if self._private_ok(a)]
        if not ok:
            if pinned:
                raise Denied(f"private address {pinned[0]} for {name} "
                             "(set egress_private_ranges_ok)")
            raise Denied(f"{name} has no address")
        return ok

    async def _connect(self, addrs: list[IPAddress], port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for addr in addrs:
            s = socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET,
                              socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            _buffers(s)  # before connect: the window is advertised in the SYN
            try:
                await asyncio.wait_for(loop.sock_connect(s, (str(addr), port)),
                                       HANDSHAKE_TIMEOUT_S)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except (OSError, TimeoutError) as err:
                s.close()
                last = err if isinstance(err, OSError) else OSError(f"timeout to {addr}")
        raise Denied(f"upstream connection failed: {last}")

    async def _first_bytes(self, conn: socket.socket, name: str, port: int,
                           have: bytes = b"") -> bytes:
        """Read until the inspector decides; returns what was read (to send upstream).

        `have`: bytes already read (what followed a CONNECT's head)."""
        loop = asyncio.get_running_loop()
        buf = have
        start = loop.time()
        while True:
            waited = loop.time() - start
            quiet = not buf and waited >= FIRST_BYTES_GRACE_S
            verdict = self.settings.inspector.judge(name, port, buf, quiet=quiet)
            if isinstance(verdict, inspect.Deny):
                raise Denied(verdict.reason)
            if isinstance(verdict, inspect.Pass):
                return buf
            limit = (FIRST_BYTES_GRACE_S if not buf else HANDSHAKE_TIMEOUT_S) - waited
            if limit <= 0:
                raise Denied(f"no complete TLS ClientHello or HTTP request in "
                             f"{HANDSHAKE_TIMEOUT_S:g} s")
            try:
                chunk = await asyncio.wait_for(
                    loop.sock_recv(conn, inspect.MAX_FIRST_BYTES - len(buf)), limit)
            except TimeoutError:
                continue
            if not chunk:
                raise Denied("the client closed before it was judged")
            buf += chunk
            if len(buf) >= inspect.MAX_FIRST_BYTES:
                verdict = self.settings.inspector.judge(name, port, buf, quiet=False)
                if isinstance(verdict, inspect.Pass):
                    return buf
                raise Denied(verdict.reason if isinstance(verdict, inspect.Deny)
                             else f"first {len(buf)} bytes decided nothing")

    async def _named(self, flow: Flow, conn: socket.socket, name: str, *,
                     pinned: tuple[ipaddress.IPv4Address, ...], port: int,
                     first: bytes | None = None) -> tuple[socket.socket, bytes]:
        """Connect a flow to name:port; first: bytes already judged (None: judge now)."""
        flow.name = name
        self._name_ports(name, port)
        addrs = self._pick(name, pinned)
        if first is None:
            first = await self._first_bytes(conn, name, port)
        if self._capped():
            raise Denied(self._cap_reason())
        upstream = await self._connect(addrs, port)
        flow.addr = str(upstream.getpeername()[0])
        return upstream, first

    async def _by_address(self, flow: Flow, addr: IPAddress,
                          port: int) -> tuple[socket.socket, bytes]:
        flow.addr = str(addr)
        if not self.allow.allows_addr(addr, port):
            raise Denied(f"IP literal {_hostport(addr, port)}: only CIDR entries allow "
                         "addresses")
        if not self._private_ok(addr):
            raise Denied(f"private address {_hostport(addr, port)}: only a CIDR entry "
                         "within that range (or egress_private_ranges_ok) allows it")
        if self._capped():
            raise Denied(self._cap_reason())
        return await self._connect([addr], port), b""

    async def _capture_open(self, flow: Flow, conn: socket.socket, dst: IPAddress,
                            port: int) -> tuple[socket.socket, bytes]:
        if self._capped():
            flow.addr = str(dst)
            raise Denied(self._cap_reason())
        mapping = self.table.lookup(dst)
        if mapping is not None:
            return await self._named(flow, conn, mapping.name, pinned=mapping.pinned,
                                     port=port)
        flow.addr = str(dst)
        if isinstance(dst, ipaddress.IPv4Address) and dst in dns.SYNTHETIC:
            raise Denied(f"{dst} is no name's address (a stale DNS answer?)")
        if any(dst.version == n.version and dst in n for n in LOOPBACK):
            # The ruleset returns loopback before the redirect: a captured
            # flow "to" loopback was a connect to the listener itself.
            raise Denied("connection to agentd's own socket")
        return await self._by_address(flow, dst, port)

    # ------------------------------------------------------------ explicit proxy
    async def _proxy_open(self, flow: Flow,
                          conn: socket.socket) -> tuple[socket.socket, bytes]:
        loop = asyncio.get_running_loop()
        buf = b""
        deadline = loop.time() + HANDSHAKE_TIMEOUT_S
        while True:
            try:
                req = httphost.parse_request_head(buf)
            except httphost.HttpError as err:
                await _proxy_refuse(conn, 400, f"malformed proxy request: {err}")
                raise Denied(f"malformed proxy request: {err}") from None
            if req is not None:
                break
            left = deadline - loop.time()
            if left <= 0:
                raise Denied("no proxy request head in time")
            chunk = await asyncio.wait_for(loop.sock_recv(conn, httphost.MAX_HEAD), left)
            if not chunk:
                raise Denied("the client closed before it was judged")
            buf += chunk
        assert req.host is not None
        port = req.port or (443 if req.method == "CONNECT" else 80)
        flow.port = port
        if req.method != "CONNECT" and not req.absolute:
            await _proxy_refuse(conn, 400, "not a proxy request (CONNECT or http://...)")
            raise Denied("not a proxy request")
        try:
            upstream, first = await self._proxy_target(flow, conn, req, buf,
                                                       host=req.host, port=port)
        except Denied as err:
            await _proxy_refuse(conn, 403, str(err))
            raise
        return upstream, first

    async def _proxy_target(self, flow: Flow, conn: socket.socket, req: httphost.Request,
                            buf: bytes, *, host: str, port: int) -> tuple[socket.socket, bytes]:
        try:
            addr: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if self._capped():
            raise Denied(self._cap_reason())
        if req.method == "CONNECT":
            rest = buf[req.head_len:]
            if addr is not None:
                upstream, _ = await self._by_address(flow, addr, port)
                await asyncio.get_running_loop().sock_sendall(
                    conn, b"HTTP/1.1 200 Connection established\r\n\r\n")
                return upstream, rest
            name = canonical_name(host)
            self._name_ports(name, port)
            flow.name = name
            pinned = await self._resolve(name)
            self._pick(name, pinned)
            # The tunnel's first bytes are judged like a captured flow's: the
            # 200 goes first, since the client sends its hello only after it.
            await asyncio.get_running_loop().sock_sendall(
                conn, b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = await self._first_bytes(conn, name, port, have=rest)
            return await self._named(flow, conn, name, pinned=pinned, port=port,
                                     first=first)
        # Absolute-form plain HTTP: the first request goes out in origin form.
        target_end = buf.index(b" ", buf.index(b" ") + 1)
        target = buf[buf.index(b" ") + 1: target_end]
        path = b"/" + target[7:].split(b"/", 1)[1] if b"/" in target[7:] else b"/"
        head = buf[: buf.index(b" ") + 1] + path + buf[target_end:]
        if addr is not None:
            upstream, _ = await self._by_address(flow, addr, port)
            return upstream, head
        name = canonical_name(host)
        self._name_ports(name, port)
        flow.name = name
        return await self._named(flow, conn, name, pinned=await self._resolve(name),
                                 port=port, first=head)

    async def _resolve(self, name: str) -> tuple[ipaddress.IPv4Address, ...]:
        try:
            real = await self._upstream(name)
        except OSError as err:
            raise Denied(f"cannot resolve {name}: {err}") from None
        self.table.pin(name, tuple(real))
        return tuple(real)

    # ------------------------------------------------------------ DNS
    async def _upstream(self, name: str) -> list[ipaddress.IPv4Address]:
        """The name's A records, from the cache if asked in the last DNS_CACHE_S.

        Concurrent lookups of one name share one query: an agent's flood of
        lookups of an allowed name costs the upstream resolver one a period.
        """
        loop = asyncio.get_running_loop()
        hit = self._dns_cache.get(name)
        if hit is not None and loop.time() - hit[0] < DNS_CACHE_S:
            return await asyncio.shield(hit[1])
        fut: asyncio.Future[list[ipaddress.IPv4Address]] = asyncio.ensure_future(
            resolve_a(name, self.settings.resolvers))
        if len(self._dns_cache) >= DNS_CACHE_MAX:
            self._dns_cache.pop(next(iter(self._dns_cache)))
        self._dns_cache[name] = (loop.time(), fut)
        try:
            return await asyncio.shield(fut)
        except OSError:
            # Failures are not cached: the next lookup asks again.
            if self._dns_cache.get(name, (0.0, None))[1] is fut:
                del self._dns_cache[name]
            raise

    async def _answer(self, data: bytes) -> bytes | None:
        out = await dns.answer(data, self.allow, self.table, self._upstream)
        if out.name or out.reply is not None:
            self._emit({"kind": "dns", "agent": self.id, "name": _short(out.name),
                        "qtype": out.qtype, "verdict": out.verdict,
                        "reason": _short(out.reason)})
        return out.reply

    async def _udp_dns(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        while True:
            data, peer = await loop.sock_recvfrom(sock, dns.MAX_QUERY + 1)
            if len(pending) >= FLOW_LIMIT:
                continue  # a flood of queries: drop, as a busy resolver would

            async def one(data: bytes = data, peer: Any = peer) -> None:
                reply = await self._answer(data)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        await loop.sock_sendto(sock, reply, peer)

            t = loop.create_task(one())
            pending.add(t)
            t.add_done_callback(pending.discard)

    async def _dns_tcp(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(MAX_DNS_TCP_MESSAGES):
            head = await _recv_exactly(conn, 2, HANDSHAKE_TIMEOUT_S)
            if head is None:
                return
            n = struct.unpack(">H", head)[0]
            data = await _recv_exactly(conn, n, HANDSHAKE_TIMEOUT_S)
            if data is None:
                return
            reply = await self._answer(data)
            if reply is None:
                return
            await loop.sock_sendall(conn, struct.pack(">H", len(reply)) + reply)

    # ------------------------------------------------------------ pumping
    def _budget(self, want: int) -> int:
        if not self.byte_cap:
            return want
        return max(0, min(want, self.byte_cap - self.bytes_used))

    async def _pump(self, flow: Flow, conn: socket.socket, upstream: socket.socket) -> str:
        def out(n: int) -> None:
            flow.bytes_out += n
            self._spend(n)

        def into(n: int) -> None:
            flow.bytes_in += n
            self._spend(n)

        a = asyncio.ensure_future(pump.one_way(conn, upstream, self._budget, out))
        b = asyncio.ensure_future(pump.one_way(upstream, conn, self._budget, into))
        try:
            results = await asyncio.gather(a, b)
        except BaseException:
            # One direction failed (ECONNRESET) or the flow was cut: the other
            # must end before the caller closes the sockets, or it would stay
            # parked on a closed descriptor that a later flow's socket reuses.
            a.cancel()
            b.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
            raise
        if "cap" in results or self._capped():
            return self._cap_reason()
        return "closed"


def _buffers(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


def _short(text: str | None) -> str | None:
    """A reason or name cut to REASON_MAX characters: agent bytes quoted in it stay bounded."""
    if text is None or len(text) <= REASON_MAX:
        return text
    return text[:REASON_MAX - 3] + "..."


def _why(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _hostport(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


async def _recv_exactly(conn: socket.socket, n: int, timeout: float) -> bytes | None:
    loop = asyncio.get_running_loop()
    buf = b""
    while len(buf) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(conn, n - len(buf)), timeout)
        if not chunk:
            return None
        buf += chunk
    return buf


async def _proxy_refuse(conn: socket.socket, status: int, reason: str) -> None:
    body = (reason + "\n").encode("utf-8", "replace")
    head = (f"HTTP/1.1 {status} {'Forbidden' if status == 403 else 'Bad Request'}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(conn, head + body), 1.0)
