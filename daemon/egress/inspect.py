"""What a named flow's first bytes say: the SNI or Host check, in one replaceable place.

The service asks an Inspector about the client's first bytes before it
connects upstream. SniHostInspector only reads (no TLS interception); a
later mode that terminates TLS implements the same Protocol and returns
its own Pass (the seam issue 13 asks to leave).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from daemon.egress import httphost, tls

# Where a client must speak first, and in TLS or HTTP: everything else on
# these ports would be an unchecked tunnel to an allowed name.
CHECKED_PORTS = frozenset({80, 443})
MAX_FIRST_BYTES = max(tls.MAX_BUFFER, httphost.MAX_HEAD)


@dataclass(frozen=True)
class Pending:
    """Not enough bytes yet."""


@dataclass(frozen=True)
class Pass:
    """Connect and forward what was read, then pump."""


@dataclass(frozen=True)
class Deny:
    reason: str


Judgement = Pending | Pass | Deny


class Inspector(Protocol):
    def judge(self, name: str, port: int, first: bytes, *, quiet: bool) -> Judgement:
        """Judge a flow to name:port from its first bytes (quiet: the client sent nothing
        for the grace period, a server-first protocol perhaps)."""


class SniHostInspector:
    """TLS: the SNI must be the name (no SNI, ECH: denied). HTTP: the Host must be."""

    def judge(self, name: str, port: int, first: bytes, *, quiet: bool) -> Judgement:
        if quiet and not first:
            if port in CHECKED_PORTS:
                return Deny(f"port {port} needs TLS or HTTP, and the client sent nothing")
            return Pass()
        if not first:
            return Pending()
        if tls.is_tls_start(first):
            return self._tls(name, first)
        if httphost.may_be_http(first):
            line = httphost.is_http_request_line(first)
            if line is None:
                return Pending()
            if line:
                return self._http(name, first)
        if port in CHECKED_PORTS:
            return Deny(f"port {port} needs TLS or HTTP; the client sent something else")
        return Pass()

    def _tls(self, name: str, first: bytes) -> Judgement:
        try:
            hello = tls.parse_client_hello(first)
        except tls.TlsError as err:
            return Deny(f"malformed TLS ClientHello: {err}")
        if hello is None:
            return Pending()
        if hello.ech:
            return Deny("ECH")
        if hello.sni is None:
            return Deny("no SNI")
        if hello.sni != name:
            return Deny(f"TLS SNI {hello.sni} does not match {name}")
        return Pass()

    def _http(self, name: str, first: bytes) -> Judgement:
        # HTTP on any port is parsed strictly: a malformed head is where the
        # server and we could read two different hosts.
        try:
            req = httphost.parse_request_head(first)
        except httphost.HttpError as err:
            return Deny(f"malformed HTTP request: {err}")
        if req is None:
            return Pending()
        if req.host != name:
            return Deny(f"HTTP Host {req.host} does not match {name}")
        return Pass()
