"""The agent's resolver: synthetic answers for allowlisted names, nothing for the rest.

An A query for an allowlisted name is resolved upstream (by the caller's
`upstream` function), the real addresses are pinned, and the agent gets a
synthetic address from 198.18.0.0/15 (RFC 2544's benchmarking range, never
routed) that maps back to the name: the capture listener later sees that
address as the flow's original destination and knows which name, and which
real addresses, the flow may reach. Any other name is refused before a
single byte leaves: a query is the exfiltration channel (sandbox-runtime's
issue #88), so the upstream is asked only for names the allowlist holds.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dnslib

from daemon.egress.allowlist import Allowlist, canonical_name

SYNTHETIC = ipaddress.IPv4Network("198.18.0.0/15")
ANSWER_TTL = 30  # seconds: short, so a client asks again and the pins stay fresh
TABLE_SIZE = 4096  # synthetic addresses per agent; the least recently used is reused
MAX_QUERY = 4096  # bytes; EDNS payloads above this are not needed for one question

Upstream = Callable[[str], Awaitable[list[ipaddress.IPv4Address]]]


@dataclass
class Mapping:
    """One synthetic address: the name it stands for and the real addresses pinned."""

    name: str
    addr: ipaddress.IPv4Address
    pinned: tuple[ipaddress.IPv4Address, ...]


class SyntheticTable:
    """Name <-> synthetic address for one agent, bounded, least recently used reused."""

    def __init__(self, size: int = TABLE_SIZE) -> None:
        if not 1 <= size < SYNTHETIC.num_addresses - 2:
            raise ValueError(f"table size {size} does not fit {SYNTHETIC}")
        self._size = size
        self._by_name: OrderedDict[str, Mapping] = OrderedDict()
        self._by_addr: dict[ipaddress.IPv4Address, Mapping] = {}
        self._next = 1  # offset into SYNTHETIC; .0 is skipped, it reads as a network

    def pin(self, name: str, pinned: tuple[ipaddress.IPv4Address, ...]) -> Mapping:
        """The mapping of name, made or refreshed with these real addresses."""
        m = self._by_name.get(name)
        if m is not None:
            m.pinned = pinned
            self._by_name.move_to_end(name)
            return m
        if len(self._by_name) >= self._size:
            _, old = self._by_name.popitem(last=False)
            del self._by_addr[old.addr]
            addr = old.addr
        else:
            addr = SYNTHETIC.network_address + self._next
            self._next += 1
        m = Mapping(name, addr, pinned)
        self._by_name[name] = m
        self._by_addr[addr] = m
        return m

    def lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Mapping | None:
        if not isinstance(addr, ipaddress.IPv4Address):
            return None
        m = self._by_addr.get(addr)
        if m is not None:
            self._by_name.move_to_end(m.name)
        return m

    def __len__(self) -> int:
        return len(self._by_name)


@dataclass(frozen=True)
class Outcome:
    """A reply (None: drop the packet) and what to report of it."""

    reply: bytes | None
    name: str
    qtype: str
    verdict: str  # "answered" | "refused"
    reason: str


def _qname(record: Any) -> str:
    # Labels come as bytes; a label may hold a '.' on the wire ("evil.allowed"
    # as one label), which would read as two labels once joined: refused.
    labels: tuple[bytes, ...] = tuple(record.q.qname.label)
    if any(b"." in lab for lab in labels):
        raise ValueError("a label holds a '.'")
    return canonical_name(b".".join(labels))


def _reply(query: Any, rcode: int) -> bytes:
    r = query.reply()
    r.header.rcode = rcode
    r.header.aa = 1
    return bytes(r.pack())


async def answer(data: bytes, allow: Allowlist, table: SyntheticTable,
                 upstream: Upstream) -> Outcome:
    """Answer one DNS query message (UDP payload or one TCP message).

    upstream(name) is awaited only for an A query of an allowlisted name; it
    returns the real addresses (empty: the name does not exist) and raises
    OSError when no upstream answered. Never raises for a bad query.
    """
    if len(data) > MAX_QUERY:
        return Outcome(None, "", "", "refused", f"query of {len(data)} bytes")
    try:
        query = dnslib.DNSRecord.parse(data)
    except Exception:  # dnslib raises several types for garbage; all mean "not DNS"
        return Outcome(None, "", "", "refused", "not a DNS query")
    if query.header.qr or query.header.opcode != 0 or len(query.questions) != 1:
        return Outcome(_reply(query, dnslib.RCODE.FORMERR), "", "", "refused",
                       "not one standard query")
    qtype = str(dnslib.QTYPE.get(query.q.qtype))
    raw_name = str(query.q.qname).rstrip(".")
    try:
        name = _qname(query)
    except ValueError as err:
        return Outcome(_reply(query, dnslib.RCODE.REFUSED), raw_name[:253], qtype, "refused",
                       f"not a valid name: {err}")
    if query.q.qclass != dnslib.CLASS.IN:
        return Outcome(_reply(query, dnslib.RCODE.REFUSED), name, qtype, "refused",
                       "not class IN")
    if not allow.name_entries(name):
        return Outcome(_reply(query, dnslib.RCODE.REFUSED), name, qtype, "refused",
                       f"{name} is not in the allowlist")
    if query.q.qtype != dnslib.QTYPE.A:
        # NOERROR with no answer (NODATA), not REFUSED: a client that asks
        # AAAA or HTTPS first then asks A, where REFUSED may end its lookup.
        return Outcome(_reply(query, dnslib.RCODE.NOERROR), name, qtype, "answered",
                       "no records but A are served")
    try:
        real = await upstream(name)
    except OSError as err:
        return Outcome(_reply(query, dnslib.RCODE.SERVFAIL), name, qtype, "refused",
                       f"upstream resolution failed: {err}")
    if not real:
        return Outcome(_reply(query, dnslib.RCODE.NXDOMAIN), name, qtype, "refused",
                       f"{name} has no A record upstream")
    m = table.pin(name, tuple(real))
    r = query.reply()
    r.header.aa = 1
    r.add_answer(dnslib.RR(query.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(str(m.addr)),
                           ttl=ANSWER_TTL))
    return Outcome(bytes(r.pack()), name, qtype, "answered", f"synthetic {m.addr}")
