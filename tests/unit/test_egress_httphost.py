"""daemon.egress.httphost: request targets from real and hostile request heads."""

from __future__ import annotations

import pytest

from daemon.egress.httphost import (
    MAX_HEAD,
    HttpError,
    Request,
    may_be_http,
    parse_request_head,
)


def test_origin_form() -> None:
    head = b"GET /x HTTP/1.1\r\nHost: Api.Example.com:8080\r\nAccept: */*\r\n\r\nbody"
    assert parse_request_head(head) == Request("GET", "api.example.com", 8080, False,
                                               len(head) - 4)


def test_every_prefix_asks_for_more() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n"
    for n in range(len(head)):
        assert parse_request_head(head[:n]) is None
    assert parse_request_head(head) is not None


def test_connect_and_absolute_forms() -> None:
    head = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert parse_request_head(head) == Request("CONNECT", "api.example.com", 443, False,
                                               len(head))
    got = parse_request_head(b"GET http://A.com/p?q HTTP/1.1\r\nHost: a.com\r\n\r\n")
    assert got is not None and (got.host, got.port, got.absolute) == ("a.com", None, True)
    got = parse_request_head(b"GET http://[2001:db8::1]:81/ HTTP/1.1\r\n\r\n")
    assert got is not None and (got.host, got.port) == ("2001:db8::1", 81)


@pytest.mark.parametrize(("head", "why"), [
    (b"GET / HTTP/1.1\r\nHost: evil\0.allowed.com\r\n\r\n", "NUL"),
    (b"GET / HTTP/1.1\r\nHost: evil%00.allowed.com\r\n\r\n", "host"),
    (b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n", "two Host"),
    (b"GET / HTTP/1.1\r\n\r\n", "no Host"),
    (b"GET / HTTP/1.1\r\nHost : a.com\r\n\r\n", "malformed"),
    (b"GET / HTTP/1.1\r\nX: y\r\n Host: a.com\r\n\r\n", "folding"),
    (b"GET / HTTP/1.1\nHost: a.com\r\n\r\n", "bare CR or LF"),
    (b"GET / HTTP/1.1\r\nHost: a.com\r\r\n\r\n", "bare CR or LF"),
    (b"GET / HTTP/2.0\r\nHost: a.com\r\n\r\n", "HTTP/1.x"),
    (b"GET  / HTTP/1.1\r\nHost: a.com\r\n\r\n", "HTTP/1.x"),
    (b"GET http://a.com/ HTTP/1.1\r\nHost: b.com\r\n\r\n", "differs"),
    (b"GET http://u@a.com/ HTTP/1.1\r\n\r\n", "user information"),
    (b"CONNECT a.com HTTP/1.1\r\n\r\n", "needs a port"),
    (b"CONNECT a.com:0 HTTP/1.1\r\n\r\n", "bad port"),
    (b"CONNECT a.com:99999 HTTP/1.1\r\n\r\n", "bad port"),
    (b"GET / HTTP/1.1\r\nHost: a b.com\r\n\r\n", "host"),
    (b"GET ftp://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", "not origin"),
    (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "unclosed"),
])
def test_hostile_heads_are_refused(head: bytes, why: str) -> None:
    with pytest.raises(HttpError, match=why):
        parse_request_head(head)


def test_a_hostile_partial_head_is_refused_at_once() -> None:
    with pytest.raises(HttpError, match="bare"):
        parse_request_head(b"GET / HTTP/1.1\nHost")


def test_oversize_head() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
    with pytest.raises(HttpError, match="longer"):
        parse_request_head(head)


def test_mixed_case_host_matches_canonically() -> None:
    got = parse_request_head(b"GET / HTTP/1.1\r\nhOsT:  API.EXAMPLE.COM.  \r\n\r\n")
    assert got is not None and got.host == "api.example.com"


@pytest.mark.parametrize(("first", "want"), [
    (b"GET ", True), (b"G", True), (b"CONNECT", True), (b"\x16\x03", False),
    (b"get /", False), (b"SSH-2.0-", False), (b"", True), (b" GET", False),
])
def test_may_be_http(first: bytes, want: bool) -> None:
    assert may_be_http(first) is want
