"""daemon.egress.allowlist: the grammar, canonical names, matching and coverage."""

from __future__ import annotations

import ipaddress

import pytest

from daemon.egress.allowlist import Allowlist, Entry, canonical_name, parse, parse_entry


@pytest.mark.parametrize(("raw", "want"), [
    ("api.anthropic.com", "api.anthropic.com"),
    ("API.Anthropic.COM", "api.anthropic.com"),
    ("api.anthropic.com.", "api.anthropic.com"),
    (b"Api.Example.com", "api.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("faß.de", "xn--fa-hia.de"),           # IDNA 2008: ß is kept, not mapped to "ss"
    ("a-b.c0.example", "a-b.c0.example"),
])
def test_canonical_names(raw: str | bytes, want: str) -> None:
    assert canonical_name(raw) == want


@pytest.mark.parametrize("raw", [
    "", ".", "evil\0.allowed.com", b"evil\x00.allowed.com", "a..b", ".a.b", "a.b..",
    "a b.com", "a\tb.com", "a\nb.com", "a\x7fb.com", "a\x85b.com", "under_score.com",
    "-lead.com", "trail-.com", "a.com/x", "a.com:443", "a@b.com", "*.a.com",
    "zero\u200bwidth.com", "bidi\u202e.com", "x" * 64 + ".com",
    ".".join(["a" * 60] * 5), b"caf\xc3\xa9.com", b"\xff.com", "xn--zz.com",
    "a" * 5000,
])
def test_odd_names_are_refused(raw: str | bytes) -> None:
    with pytest.raises(ValueError):
        canonical_name(raw)


def test_longest_name_is_accepted() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert canonical_name(name) == name
    with pytest.raises(ValueError, match="longer than 253"):
        canonical_name(name + "d")


@pytest.mark.parametrize(("raw", "text"), [
    ("api.anthropic.com:443", "api.anthropic.com:443"),
    ("  Api.Anthropic.com.:443 ", "api.anthropic.com:443"),
    ("*.GitHubUserContent.com:443", "*.githubusercontent.com:443"),
    ("10.1.2.0/24:5432", "10.1.2.0/24:5432"),
    ("192.0.2.7:443", "192.0.2.7:443"),
    ("192.0.2.7/32:443", "192.0.2.7:443"),
    ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
    ("[2001:DB8::1]:443", "[2001:db8::1]:443"),
    ("example.com:8000-8999", "example.com:8000-8999"),
    ("example.com:443-443", "example.com:443"),
    ("1password.com:443", "1password.com:443"),
])
def test_entries_in_canonical_form(raw: str, text: str) -> None:
    assert parse_entry(raw).text == text


def test_entry_fields() -> None:
    name, wild, net, net6 = parse(["a.com:443", "*.b.com:1-2", "10.0.0.0/8:22",
                                   "[::1]:80"])
    assert name == Entry("a.com:443", "a.com", False, None, (443, 443))
    assert wild == Entry("*.b.com:1-2", "b.com", True, None, (1, 2))
    assert net == Entry("10.0.0.0/8:22", None, False, ipaddress.ip_network("10.0.0.0/8"),
                        (22, 22))
    assert net6.network == ipaddress.ip_network("::1/128")


@pytest.mark.parametrize(("raw", "why"), [
    ("api.x.com", "add one, e.g. 'api.x.com:443'"),
    ("api.x.com:0", "outside 1-65535"),
    ("api.x.com:65536", "outside 1-65535"),
    ("api.x.com:http", "not a number"),
    ("api.x.com:-1", "not a number"),
    ("api.x.com:+443", "not a number"),
    ("api.x.com:", "not a number"),
    ("api.x.com:9-1", "runs backwards"),
    ("2001:db8::/32:443", "brackets"),
    ("[192.0.2.0/24]:443", "IPv6 only"),
    ("[2001:db8::/32]443", "write IPv6"),
    ("10.1.2.3/24:443", "did you mean 10.1.2.0/24"),
    ("a.*.com:443", "leading"),
    ("*:443", "leading"),
    ("*.com:443", "top-level"),
    ("10.1:443", "reads as an IP address"),
    ("evil\0.allowed.com:443", "control"),
    (":443", "empty name"),
    ("", "empty"),
])
def test_bad_entries_say_why(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match="allow entry") as err:
        parse([raw])
    assert why in str(err.value)


def test_parse_drops_duplicates_and_refuses_a_bare_string() -> None:
    assert [e.text for e in parse(["a.com:443", "A.com:443", "b.com:1"])] == [
        "a.com:443", "b.com:1"]
    with pytest.raises(TypeError):
        parse("a.com:443")


def test_matching_names_and_ports() -> None:
    allow = Allowlist.of(["api.x.com:443", "*.cdn.com:443", "dev.y.com:8000-8999"])
    assert allow.allows_name("api.x.com", 443)
    assert not allow.allows_name("api.x.com", 80)
    assert not allow.allows_name("x.com", 443)
    assert not allow.allows_name("evil-api.x.com", 443)
    assert allow.allows_name("a.cdn.com", 443)
    assert allow.allows_name("a.b.cdn.com", 443)
    assert not allow.allows_name("cdn.com", 443)
    assert not allow.allows_name("evilcdn.com", 443)
    assert allow.allows_name("dev.y.com", 8500)
    assert not allow.allows_name("dev.y.com", 9000)
    assert [e.text for e in allow.name_entries("api.x.com")] == ["api.x.com:443"]
    assert allow.texts() == ["api.x.com:443", "*.cdn.com:443", "dev.y.com:8000-8999"]


def test_matching_addresses() -> None:
    allow = Allowlist.of(["10.1.2.0/24:5432", "[2001:db8::/32]:443", "db.x.com:5432"])
    ip = ipaddress.ip_address
    assert allow.allows_addr(ip("10.1.2.9"), 5432)
    assert not allow.allows_addr(ip("10.1.3.9"), 5432)
    assert not allow.allows_addr(ip("10.1.2.9"), 5433)
    assert allow.allows_addr(ip("::ffff:10.1.2.9"), 5432)   # mapped: judged as IPv4
    assert allow.allows_addr(ip("2001:db8::5"), 443)
    assert not allow.allows_addr(ip("2001:db9::5"), 443)
    assert allow.names_addr(ip("10.1.2.1"))
    assert not Allowlist().allows_addr(ip("10.1.2.9"), 5432)


def test_covers() -> None:
    wide = Allowlist.of(["*.x.com:1-1000", "api.y.com:443", "10.0.0.0/8:1-65535"])
    assert wide.covers(Allowlist.of(["a.x.com:443", "*.a.x.com:80", "*.x.com:443"]))
    assert wide.covers(Allowlist.of(["api.y.com:443", "10.1.0.0/16:22", "10.0.0.1:5"]))
    assert wide.covers(Allowlist())
    assert not wide.covers(Allowlist.of(["x.com:443"]))          # the suffix itself
    assert not wide.covers(Allowlist.of(["a.x.com:2000"]))
    assert not wide.covers(Allowlist.of(["*.y.com:443"]))
    assert not wide.covers(Allowlist.of(["api.y.com:444"]))
    assert not wide.covers(Allowlist.of(["11.0.0.0/8:22"]))
    assert not wide.covers(Allowlist.of(["[::ffff:0:0/96]:22"]))
    assert not Allowlist().covers(wide)
