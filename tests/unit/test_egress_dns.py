"""daemon.egress.dns and .upstream: synthetic answers, refusals, and what reaches upstream."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import dnslib
import pytest

from daemon.egress.allowlist import Allowlist
from daemon.egress.dns import SYNTHETIC, Outcome, SyntheticTable, answer
from daemon.egress.upstream import host_resolvers, resolve_a
from tests.unit.dnsserver import RecordingDns

ALLOW = Allowlist.of(["api.example.com:443", "*.cdn.example:443"])
REAL = ipaddress.IPv4Address("192.0.2.10")


def _ask(name: str | bytes, qtype: str = "A", allow: Allowlist = ALLOW,
         table: SyntheticTable | None = None) -> tuple[Outcome, list[str]]:
    asked: list[str] = []

    async def upstream(n: str) -> list[ipaddress.IPv4Address]:
        asked.append(n)
        return [REAL]

    if isinstance(name, bytes):
        q = dnslib.DNSRecord.question("placeholder.example", qtype)
        q.q.qname = dnslib.DNSLabel(name.split(b"/"))
    else:
        q = dnslib.DNSRecord.question(name, qtype)
    table = table if table is not None else SyntheticTable()  # an empty table is falsy
    out = asyncio.run(answer(bytes(q.pack()), allow, table, upstream))
    return out, asked


def _rcode(out: Outcome) -> str:
    assert out.reply is not None
    return str(dnslib.RCODE.get(dnslib.DNSRecord.parse(out.reply).header.rcode))


def test_allowlisted_name_gets_a_synthetic_address_mapped_back() -> None:
    table = SyntheticTable()
    out, asked = _ask("API.example.com", table=table)
    assert asked == ["api.example.com"] and out.verdict == "answered"
    rr = dnslib.DNSRecord.parse(out.reply).rr
    addr = ipaddress.IPv4Address(str(rr[0].rdata))
    assert addr in SYNTHETIC and rr[0].ttl == 30
    m = table.lookup(addr)
    assert m is not None and (m.name, m.pinned) == ("api.example.com", (REAL,))


def test_unlisted_names_never_reach_upstream() -> None:
    for name in ("secret-data.evil.example", "cdn.example", "example.com"):
        out, asked = _ask(name)
        assert asked == [] and out.verdict == "refused" and _rcode(out) == "REFUSED"
        assert "not in the allowlist" in out.reason


@pytest.mark.parametrize("labels", [b"evil\0/api/example/com", b"evil.api/example/com",
                                    b"caf\xc3\xa9/cdn/example"])
def test_odd_labels_are_refused(labels: bytes) -> None:
    out, asked = _ask(labels)
    assert asked == [] and _rcode(out) == "REFUSED" and "not a valid name" in out.reason


def test_aaaa_and_others_get_no_data_for_listed_names_without_upstream() -> None:
    for qtype in ("AAAA", "HTTPS", "TXT", "MX"):
        out, asked = _ask("a.cdn.example", qtype)
        assert asked == [] and _rcode(out) == "NOERROR"
        assert dnslib.DNSRecord.parse(out.reply).rr == []
    out, asked = _ask("evil.example", "TXT")
    assert asked == [] and _rcode(out) == "REFUSED"


def test_garbage_is_dropped() -> None:
    async def never(n: str) -> list[ipaddress.IPv4Address]:
        raise AssertionError(n)

    for data in (b"", b"\x00" * 5, b"\xff" * 100, b"x" * 5000):
        out = asyncio.run(answer(data, ALLOW, SyntheticTable(), never))
        assert out.reply is None and out.verdict == "refused"


def test_table_is_bounded_and_reuses_the_least_recent() -> None:
    t = SyntheticTable(size=2)
    a, b = t.pin("a.x", ()), t.pin("b.x", ())
    assert t.lookup(a.addr) is a                  # a is now the most recent
    c = t.pin("c.x", ())
    assert c.addr == b.addr and t.lookup(b.addr) is c and len(t) == 2
    assert t.pin("a.x", (REAL,)).addr == a.addr


def test_resolve_a_against_a_real_server() -> None:
    with RecordingDns({"api.example.com": "192.0.2.10"}) as srv:
        assert asyncio.run(resolve_a("api.example.com", [srv.addr])) == [REAL]
        assert asyncio.run(resolve_a("nx.example.com", [srv.addr])) == []
        assert srv.seen == ["api.example.com", "nx.example.com"]


def test_resolve_a_falls_back_to_tcp_when_truncated() -> None:
    with RecordingDns({"api.example.com": "192.0.2.10"}, truncate=True) as srv:
        assert asyncio.run(resolve_a("api.example.com", [srv.addr])) == [REAL]
        assert srv.seen == ["api.example.com", "api.example.com"]


def test_resolve_a_raises_when_nobody_answers() -> None:
    with RecordingDns({}) as srv:
        port = srv.port
    with pytest.raises(OSError, match=r"127\.0\.0\.1"):
        asyncio.run(resolve_a("a.com", [("127.0.0.1", port)], timeout=0.2))


def test_host_resolvers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n"
                    "search example\n")
    assert host_resolvers(conf) == [("10.0.0.2", 53), ("fe80::1%eth0", 53)]
    assert host_resolvers(tmp_path / "none") == []
