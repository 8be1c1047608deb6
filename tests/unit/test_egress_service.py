"""The egress service end to end: the real process, a real namespace with the contract's nft
ruleset, real upstream servers and a real DNS server on loopback that records every query."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dnslib
import pytest

from daemon.egress.allowlist import Allowlist
from daemon.egress.control import EgressService
from daemon.egress.flows import FLOW_LIMIT
from tests.unit.dnsserver import RecordingDns
from tests.unit.echoserver import Echo
from tests.unit.egressnet import AgentNetns
from tests.unit.tlshello import ext, hello, openssl_hello, sni_ext

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root: network namespaces and nftables", allow_module_level=True)

ZONE = {"allowed.test": "127.0.0.1", "other.test": "127.0.0.1", "private.test": "10.0.0.5"}


class Events:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.seen.append(event)
            self._cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
             ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.seen:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such event in {self.seen[-10:]}")
                self._cond.wait(left)

    def closed(self, **want: Any) -> dict[str, Any]:
        return self.wait(lambda e: e.get("kind") == "flow" and e.get("phase") == "close"
                         and all(e.get(k) == v for k, v in want.items()))


@dataclass
class World:
    svc: EgressService
    ns: AgentNetns
    dns: RecordingDns
    echo: Echo
    events: Events

    def add(self, allow: list[str] | None = None, byte_cap: int = 0) -> None:
        texts = allow if allow is not None else [f"allowed.test:{self.echo.port}",
                                                 f"private.test:{self.echo.port}"]
        self.svc.add("a1", "agent", Allowlist.of(texts), self.ns.fds(), byte_cap)

    def query(self, name: str, qtype: str = "A", server: str = "8.8.8.8") -> Any:
        """A DNS query over UDP from inside the namespace, to any server (it is redirected)."""
        s = self.ns.udp()
        try:
            s.settimeout(5)
            q = dnslib.DNSRecord.question(name, qtype)
            self.ns.run(lambda: s.sendto(q.pack(), (server, 53)))
            return dnslib.DNSRecord.parse(s.recv(4096))
        finally:
            s.close()

    def resolve(self, name: str) -> str:
        reply = self.query(name)
        assert reply.header.rcode == 0, reply
        return str(reply.rr[0].rdata)

    def flow(self, name: str = "allowed.test", port: int | None = None) -> socket.socket:
        return self.ns.connect(self.resolve(name), port or self.echo.port)


@pytest.fixture
def world() -> Iterator[World]:
    events = Events()
    with RecordingDns(ZONE) as dns, Echo() as echo, AgentNetns() as ns:
        svc = EgressService(resolvers=[dns.addr], private_ok=["127.0.0.0/8"], on_event=events)
        svc.start()
        try:
            w = World(svc, ns, dns, echo, events)
            w.add()
            yield w
        finally:
            svc.stop()
        assert svc.pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(svc.pid, 0)


def _closed_by_proxy(s: socket.socket) -> bool:
    try:
        s.settimeout(5)
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def _roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.settimeout(5)
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(1 << 20)
        assert chunk, f"EOF after {len(got)} of {len(data)} bytes"
        got += chunk
    return got


def test_allowed_name_flows_both_ways(world: World) -> None:
    addr = world.resolve("allowed.test")
    assert addr.startswith("198.1")
    first = openssl_hello("allowed.test")
    with world.ns.connect(addr, world.echo.port) as s:
        assert _roundtrip(s, first) == first
        bulk = os.urandom(4 << 20)
        assert _roundtrip(s, bulk) == bulk
    opened = world.events.wait(lambda e: e.get("phase") == "open")
    assert (opened["verdict"], opened["name"], opened["addr"], opened["port"],
            opened["via"]) == ("allowed", "allowed.test", "127.0.0.1", world.echo.port,
                               "capture")
    closed = world.events.closed(verdict="allowed")
    n = len(first) + len(bulk)
    assert (closed["bytes_out"], closed["bytes_in"]) == (n, n)
    assert closed["duration_s"] > 0
    assert world.dns.seen == ["allowed.test"]


def test_unlisted_name_is_refused_and_never_leaves(world: World) -> None:
    for name in ("secret-data.evil.example", "other.test"):
        reply = world.query(name)
        assert dnslib.RCODE.get(reply.header.rcode) == "REFUSED"
    reply = world.query("allowed.test", "AAAA", server="127.0.0.53")
    assert reply.header.rcode == 0 and reply.rr == []
    assert world.dns.seen == []
    e = world.events.wait(lambda e: e.get("kind") == "dns"
                          and e["name"] == "secret-data.evil.example")
    assert (e["verdict"], e["qtype"], e["agent"]) == ("refused", "A", "a1")


def test_nul_and_odd_names(world: World) -> None:
    q = dnslib.DNSRecord.question("x.test")
    q.q.qname = dnslib.DNSLabel([b"evil\0", b"allowed", b"test"])
    s = world.ns.udp()
    with s:
        s.settimeout(5)
        world.ns.run(lambda: s.sendto(q.pack(), ("1.1.1.1", 53)))
        assert dnslib.RCODE.get(dnslib.DNSRecord.parse(s.recv(4096)).header.rcode) == "REFUSED"
    assert _closed_by_proxy(_sent(world.flow(), hello(sni_ext(b"evil\0.allowed.test"))))
    assert "not a valid host name" in world.events.closed(verdict="denied")["reason"]
    assert _closed_by_proxy(_sent(world.flow(),
                                  b"GET / HTTP/1.1\r\nHost: allowed.test\0.evil\r\n\r\n"))
    # One upstream query for both flows: the second lookup came from the cache.
    assert world.echo.accepted == 0 and world.dns.seen == ["allowed.test"]


def _proxy_head(s: socket.socket, request: bytes) -> bytes:
    """Send a proxy request; the proxy's answer head."""
    s.settimeout(5)
    s.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(1)
        assert chunk, got
        got += chunk
    return got


def _sent(s: socket.socket, data: bytes) -> socket.socket:
    s.sendall(data)
    return s


@pytest.mark.parametrize(("first", "why"), [
    (openssl_hello("other.test"), "TLS SNI other.test does not match allowed.test"),
    (openssl_hello(None), "no SNI"),
    (hello(sni_ext(b"allowed.test"), ext(0xFE0D, b"\x00" * 32)), "ECH"),
    (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n",
     "HTTP Host other.test does not match allowed.test"),
])
def test_first_bytes_must_name_the_flow(world: World, first: bytes, why: str) -> None:
    assert _closed_by_proxy(_sent(world.flow(), first))
    assert world.events.closed(verdict="denied")["reason"] == why
    assert world.echo.accepted == 0


def test_http_with_the_right_host_passes(world: World) -> None:
    req = b"GET / HTTP/1.1\r\nHost: Allowed.Test:%d\r\n\r\n" % world.echo.port
    with world.flow() as s:
        assert _roundtrip(s, req) == req


def test_denied_port_says_what_is_allowed(world: World) -> None:
    addr = world.resolve("allowed.test")
    assert _closed_by_proxy(world.ns.connect(addr, 9))
    assert world.events.closed(verdict="denied")["reason"] == (
        f"allowed.test:9 is not in the allowlist (it allows allowed.test:{world.echo.port})")


@pytest.mark.parametrize(("addr", "shown"), [("192.0.2.7", "192.0.2.7:443"),
                                             ("2001:db8::1", "[2001:db8::1]:443")])
def test_ip_literals_are_denied(world: World, addr: str, shown: str) -> None:
    assert _closed_by_proxy(world.ns.connect(addr, 443))
    e = world.events.closed(verdict="denied")
    assert e["reason"] == f"IP literal {shown}: only CIDR entries allow addresses"
    assert e["addr"] == addr


def test_cidr_entry_allows_an_address(world: World) -> None:
    world.add([f"127.0.0.1:{world.echo.port}"])
    # 127/8 is the agent's own loopback (not redirected): a CIDR flow is
    # reached through the proxy's CONNECT here.
    s = world.ns.connect("127.0.0.1", 3128)
    with s:
        assert _proxy_head(s, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % world.echo.port
                           ).startswith(b"HTTP/1.1 200")
        assert _roundtrip(s, b"ping") == b"ping"


def test_private_address_of_a_name(world: World) -> None:
    addr = world.resolve("private.test")
    assert _closed_by_proxy(world.ns.connect(addr, world.echo.port))
    assert world.events.closed(verdict="denied")["reason"] == (
        "private address 10.0.0.5 for private.test (set egress_private_ranges_ok)")


def test_direct_connect_to_the_listener(world: World) -> None:
    assert _closed_by_proxy(world.ns.connect("127.0.0.1", 15001))
    assert world.events.closed(verdict="denied")["reason"] == "connection to agentd's own socket"


def test_stale_synthetic_address(world: World) -> None:
    assert _closed_by_proxy(world.ns.connect("198.19.200.1", world.echo.port))
    assert "no name's address" in world.events.closed(verdict="denied")["reason"]


def test_dns_over_tcp(world: World) -> None:
    def ask(s: socket.socket, name: str) -> Any:
        msg = dnslib.DNSRecord.question(name).pack()
        s.sendall(struct.pack(">H", len(msg)) + msg)
        n = struct.unpack(">H", s.recv(2))[0]
        return dnslib.DNSRecord.parse(s.recv(n))

    with world.ns.connect("9.9.9.9", 53) as s:
        s.settimeout(5)
        assert str(ask(s, "allowed.test").rr[0].rdata).startswith("198.1")
        assert dnslib.RCODE.get(ask(s, "leak.evil.example").header.rcode) == "REFUSED"
    assert world.dns.seen == ["allowed.test"]


def test_proxy_connect(world: World) -> None:
    with world.ns.connect("127.0.0.1", 3128) as s:
        head = b"CONNECT allowed.test:%d HTTP/1.1\r\nHost: allowed.test\r\n\r\n" % \
            world.echo.port
        assert _proxy_head(s, head).startswith(b"HTTP/1.1 200")
        hi = openssl_hello("allowed.test")
        assert _roundtrip(s, hi) == hi
    assert world.events.wait(lambda e: e.get("phase") == "open")["via"] == "proxy"
    with world.ns.connect("127.0.0.1", 3128) as s:
        s.settimeout(5)
        s.sendall(b"CONNECT secret.evil.example:443 HTTP/1.1\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"secret.evil.example:443 is not in the allowlist" in answer
    assert world.dns.seen == ["allowed.test"]


def test_proxy_absolute_form(world: World) -> None:
    with world.ns.connect("127.0.0.1", 3128) as s:
        s.settimeout(5)
        s.sendall(b"GET http://allowed.test:%d/x HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
                  % world.echo.port)
        got = s.recv(4096)
    assert got == b"GET /x HTTP/1.1\r\nHost: allowed.test\r\n\r\n"  # as the server saw it


def test_cut_closes_flows_and_empties(world: World) -> None:
    s = world.flow()
    first = openssl_hello("allowed.test")
    assert _roundtrip(s, first) == first
    world.events.wait(lambda e: e.get("phase") == "open")
    t0 = time.monotonic()
    world.svc.cut("a1", empty=True)
    assert _closed_by_proxy(s)
    assert time.monotonic() - t0 < 1
    assert world.events.closed(verdict="allowed")["reason"] == "cut"
    assert dnslib.RCODE.get(world.query("allowed.test").header.rcode) == "REFUSED"


def test_byte_cap(world: World) -> None:
    world.add(byte_cap=1 << 20)
    s = world.flow()
    s.settimeout(5)
    s.sendall(openssl_hello("allowed.test"))
    got = 0
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):
            s.sendall(b"x" * 65536)
            while True:
                try:
                    chunk = s.recv(1 << 20, socket.MSG_DONTWAIT)
                except (BlockingIOError, TimeoutError):  # a timeout socket says EAGAIN so
                    break
                if not chunk:
                    raise BrokenPipeError
                got += len(chunk)
    s.close()
    e = world.events.closed(verdict="allowed")
    assert e["reason"] == "byte cap of 1 MiB reached"
    assert e["bytes_out"] + e["bytes_in"] <= 1 << 20
    assert _closed_by_proxy(world.flow())
    assert world.events.closed(verdict="denied")["reason"] == "byte cap of 1 MiB reached"


def test_flow_limit_flood_does_not_starve_others(world: World) -> None:
    addr = world.resolve("allowed.test")
    flood = [world.ns.connect(addr, world.echo.port) for _ in range(FLOW_LIMIT + 20)]
    try:
        e = world.events.closed(verdict="denied")
        assert e["reason"] == f"flow limit ({FLOW_LIMIT}) reached"
    finally:
        for s in flood:
            s.close()
    # The held flows end (their clients are gone); a new one is served.
    deadline = time.monotonic() + 10
    while True:
        s = world.ns.connect(addr, world.echo.port)
        try:
            hi = openssl_hello("allowed.test")
            if _roundtrip(s, hi) == hi:
                break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            s.close()


def test_restart_by_the_client(world: World) -> None:
    pid = world.svc.pid
    assert pid is not None and world.svc.ping(5)
    os.kill(pid, signal.SIGKILL)
    e = world.events.wait(lambda e: e.get("kind") == "egress_restarted")
    assert e["agents"] == 1
    assert world.svc.pid != pid and world.svc.ping(5) and world.svc.alive()
    with world.flow() as s:
        hi = openssl_hello("allowed.test")
        assert _roundtrip(s, hi) == hi


# ----------------------------------------------- regressions of the security review
def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_flows_reset_by_the_agent_leave_no_task_or_descriptor(world: World) -> None:
    """An RST from the agent's side must end both directions before the sockets close."""
    assert world.svc.pid is not None
    warm = world.flow()
    _roundtrip(warm, b"warm")
    warm.close()
    world.events.closed(verdict="allowed")
    before = _fds(world.svc.pid)
    for _ in range(60):
        s = world.flow()
        _roundtrip(s, b"hi")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    # Every flow's close event arrives once both of its directions ended.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        closes = [e for e in world.events.seen if e.get("kind") == "flow"
                  and e.get("phase") == "close" and e.get("verdict") == "allowed"]
        if len(closes) >= 61 and _fds(world.svc.pid) <= before + 2:
            break
        time.sleep(0.1)
    assert _fds(world.svc.pid) <= before + 2, (before, _fds(world.svc.pid))
    # And the service still carries a new flow (no stale selector key).
    last = world.flow()
    assert _roundtrip(last, b"still here") == b"still here"
    last.close()


def test_a_huge_hostile_name_still_makes_a_denied_event(world: World) -> None:
    s = world.flow()
    s.sendall(b"GET / HTTP/1.1\r\nHost: " + b"\xff" * 15000 + b"\r\n\r\n")
    assert _closed_by_proxy(s)
    e = world.events.closed(verdict="denied")
    assert len(e["reason"]) <= 512


def test_a_broad_cidr_does_not_reach_private_ranges(world: World) -> None:
    """0.0.0.0/0 names every address, but the host's loopback only a CIDR within it may."""
    # The world's service allows 127.0.0.0/8 by egress_private_ranges_ok: a
    # service of its own here, without it.
    world.svc.remove("a1")
    svc = EgressService(resolvers=[world.dns.addr], private_ok=[], on_event=Events())
    svc.start()
    try:
        svc.add("a1", "agent", Allowlist.of([f"0.0.0.0/0:{world.echo.port}"]), world.ns.fds())
        s = world.ns.connect("127.0.0.1", 3128)
        head = _proxy_head(s, f"CONNECT 127.0.0.1:{world.echo.port} HTTP/1.1\r\n\r\n".encode())
        s.close()
        assert head.split(b" ")[1] == b"403", head
        assert world.echo.accepted == 0
        # A CIDR within the private range names it.
        svc.add("a1", "agent", Allowlist.of([f"127.0.0.0/8:{world.echo.port}"]), world.ns.fds())
        s = world.ns.connect("127.0.0.1", 3128)
        head = _proxy_head(s, f"CONNECT 127.0.0.1:{world.echo.port} HTTP/1.1\r\n\r\n".encode())
        s.close()
        assert head.split(b" ")[1] == b"200", head
    finally:
        svc.stop()
