"""daemon.egress.tls: the SNI of real and hostile ClientHellos."""

from __future__ import annotations

import pytest

from daemon.egress.tls import EXT_ECH, MAX_BUFFER, ClientHello, TlsError, parse_client_hello
from tests.unit.tlshello import ext, hello, openssl_hello, sni_ext


def test_openssl_hello() -> None:
    assert parse_client_hello(openssl_hello("api.example.com")) == ClientHello(
        "api.example.com", False)
    assert parse_client_hello(openssl_hello(None)) == ClientHello(None, False)


def test_every_prefix_of_a_hello_asks_for_more() -> None:
    data = openssl_hello("api.example.com")
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None
    assert parse_client_hello(data + b"\x17\x03\x03") is not None  # what follows is not ours


def test_hello_split_over_records_and_reads() -> None:
    data = hello(ext(0x000A, b"\x00\x02\x00\x1d"), sni_ext(b"a.example.com"), record_size=7)
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None
    assert parse_client_hello(data) == ClientHello("a.example.com", False)


@pytest.mark.parametrize(("name", "want"), [
    (b"API.Example.COM", "api.example.com"), (b"api.example.com.", "api.example.com"),
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_names_are_canonical(name: bytes, want: str) -> None:
    assert parse_client_hello(hello(sni_ext(name))) == ClientHello(want, False)


def test_ech_is_seen() -> None:
    got = parse_client_hello(hello(sni_ext(b"public.example"), ext(EXT_ECH, b"\x00" * 40)))
    assert got == ClientHello("public.example", True)


def test_no_extensions_at_all() -> None:
    assert parse_client_hello(hello(no_ext_block=True)) == ClientHello(None, False)


@pytest.mark.parametrize(("data", "why"), [
    (hello(sni_ext(b"evil\0.allowed.com")), "not a valid host name"),
    (hello(sni_ext(b"evil.com\0")), "not a valid host name"),
    (hello(sni_ext(b"caf\xc3\xa9.com")), "not a valid host name"),
    (hello(sni_ext(b"a" * 300)), "not a valid host name"),
    (hello(sni_ext(b"")), "not a valid host name"),
    (hello(sni_ext(b"a.com", b"b.com")), "two host names"),
    (hello(sni_ext(b"a.com", name_type=1)), "not host_name"),
    (hello(sni_ext(b"a.com"), sni_ext(b"b.com")), "twice"),
    (hello(ext(0, b"\x00\x00")), "empty server_name"),
    (hello(ext(0, b"\x00\x09\x00\x00\x05a.com")), "claimed"),
    (hello(sni_ext(b"a.com"), trailing=b"x"), "bytes after the extensions"),
    (hello(session=b"s" * 33), "session id"),
    (b"\x16\x03\x01\x00\x00", "record length"),
    (b"\x16\x03\x01\x40\x01" + b"\x01" * 5, "record length"),
    (b"\x16\x02\x00\x00\x05\x01\x00\x00\x01\x00", "not TLS"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
    (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "over"),
    (hello(sni_ext(b"a.com"), record_size=7)[:12] + b"\x17\x03\x03\x00\x01x", "record type"),
])
def test_hostile_hellos_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(TlsError, match=why):
        parse_client_hello(data)


def test_tiny_records_are_capped() -> None:
    with pytest.raises(TlsError, match="more than 16 records"):
        parse_client_hello(hello(sni_ext(b"a.example.com"), record_size=2))


def test_an_oversize_hello_is_refused_not_buffered_forever() -> None:
    big = hello(ext(0x0015, b"\x00" * 40000))           # padding past MAX_HELLO
    with pytest.raises(TlsError, match="over"):
        parse_client_hello(big[:100])
    assert len(big) > MAX_BUFFER
