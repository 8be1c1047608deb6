"""Real resolution of allowlisted names, from the host's side, over UDP (TCP if truncated).

Only dns.answer() calls this, and only for names the allowlist holds. A
reply is accepted only from the server asked, with the query's random id
and the same question (RFC 5452's defences against a forged answer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

import dnslib

TIMEOUT_S = 2.0


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> list[tuple[str, int]]:
    """The nameservers of resolv.conf(5), port 53; empty if there are none."""
    out: list[tuple[str, int]] = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            out.append((parts[1], 53))
    return out


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _matches(query: Any, data: bytes) -> Any | None:
    try:
        reply = dnslib.DNSRecord.parse(data)
    except Exception:  # garbage from the network: not our answer
        return None
    if (reply.header.id != query.header.id or not reply.header.qr
            or len(reply.questions) != 1 or reply.q != query.q):
        return None
    return reply


async def _udp(query: Any, server: tuple[str, int], deadline: float) -> Any:
    loop = asyncio.get_running_loop()
    with socket.socket(_family(server[0]), socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(server)  # connected: the kernel drops datagrams from anyone else
        await loop.sock_sendall(s, query.pack())
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no answer from {server[0]}:{server[1]}")
            data = await asyncio.wait_for(loop.sock_recv(s, 65535), left)
            reply = _matches(query, data)
            if reply is not None:
                return reply


async def _tcp(query: Any, server: tuple[str, int], deadline: float) -> Any:
    loop = asyncio.get_running_loop()
    left = max(0.01, deadline - loop.time())
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*server), left)
    try:
        msg = bytes(query.pack())
        writer.write(struct.pack(">H", len(msg)) + msg)
        head = await asyncio.wait_for(reader.readexactly(2), max(0.01, deadline - loop.time()))
        data = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head)[0]),
                                      max(0.01, deadline - loop.time()))
    finally:
        writer.close()
    reply = _matches(query, data)
    if reply is None:
        raise OSError(f"bad TCP answer from {server[0]}:{server[1]}")
    return reply


async def resolve_a(name: str, servers: list[tuple[str, int]],
                    timeout: float = TIMEOUT_S) -> list[ipaddress.IPv4Address]:
    """The A addresses of name (empty: NXDOMAIN or no A record), from the first server
    that answers. Raises OSError if none did (timeouts, SERVFAIL, refusals)."""
    if not servers:
        raise OSError("no upstream resolvers configured")
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    for server in servers:
        query = dnslib.DNSRecord.question(name, "A")
        query.header.id = secrets.randbelow(65536)
        deadline = loop.time() + timeout
        try:
            reply = await _udp(query, server, deadline)
            if reply.header.tc:
                reply = await _tcp(query, server, deadline)
        except (OSError, asyncio.IncompleteReadError) as err:
            errors.append(f"{server[0]}:{server[1]}: {err or type(err).__name__}")
            continue
        rcode = reply.header.rcode
        if rcode == dnslib.RCODE.NXDOMAIN:
            return []
        if rcode != dnslib.RCODE.NOERROR:
            errors.append(f"{server[0]}:{server[1]}: {dnslib.RCODE.get(rcode)}")
            continue
        return [ipaddress.IPv4Address(str(rr.rdata)) for rr in reply.rr
                if rr.rtype == dnslib.QTYPE.A]
    raise OSError("; ".join(errors))
