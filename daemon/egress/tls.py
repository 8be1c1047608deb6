"""The server name in a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3), read and never trusted.

The proxy reads the client's first bytes, decides, and then forwards them
unchanged: this module only looks. It is written for hostile input: every
length is checked against what holds it, the hello is bounded
(MAX_HELLO), a hello split over several records or several reads is
reassembled, and anything a conforming client would not send (two
server_name entries, a repeated extension, bytes left over) is refused
rather than guessed at, since a guess is where two parsers disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.egress.allowlist import canonical_name

# A hello with post-quantum key shares is ~2 KiB; 32 KiB leaves room for
# large padding or PSK identities and still bounds what one flow may hold.
MAX_HELLO = 32 * 1024
_MAX_RECORD = 1 << 14  # RFC 8446 5.1: a plaintext record's fragment is at most 2^14
# A hello may be split over records (RFC 8446 5.1), but nobody sends one
# in dozens: tiny records are a way to make a parser work, so they are capped.
_MAX_RECORDS = 16
# The most bytes a complete hello can take: what the proxy buffers, at most.
MAX_BUFFER = MAX_HELLO + 5 * _MAX_RECORDS
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
# draft-ietf-tls-esni (the ECH version deployed by browsers): the real SNI
# is encrypted, the outer one names the ECH provider; it cannot be checked.
EXT_ECH = 0xFE0D
_HOST_NAME = 0


class TlsError(ValueError):
    """The bytes are not a well-formed ClientHello (the flow is denied)."""


@dataclass(frozen=True)
class ClientHello:
    """What the proxy needs from a hello."""

    sni: str | None  # canonical name, None if there was no server_name extension
    ech: bool  # an encrypted_client_hello extension is present


class _Reader:
    """A cursor over bytes that raises TlsError on any read past the end."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise TlsError(f"{self.what}: {n} bytes claimed, {self.left()} present")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        return self.take(self.left())

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, len_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(len_size)), what)


def is_tls_start(first: bytes) -> bool:
    """Whether these first bytes can begin a TLS handshake record (one byte is enough)."""
    return bool(first) and first[0] == _HANDSHAKE


def _handshake_bytes(buf: bytes) -> bytes | None:
    """The handshake message bytes reassembled from records; None if more are needed."""
    out = bytearray()
    need: int | None = None
    pos = 0
    records = 0
    while need is None or len(out) < need:
        if records == _MAX_RECORDS:
            raise TlsError(f"ClientHello split over more than {_MAX_RECORDS} records")
        if len(buf) - pos < 5:
            return None
        ctype, major, minor, length = buf[pos], buf[pos + 1], buf[pos + 2], \
            int.from_bytes(buf[pos + 3: pos + 5], "big")
        if ctype != _HANDSHAKE:
            raise TlsError(f"record type {ctype} before the ClientHello ended")
        if major != 3 or minor > 4:
            raise TlsError(f"record version {major}.{minor} is not TLS")
        if length == 0 or length > _MAX_RECORD:
            raise TlsError(f"record length {length} is outside 1-{_MAX_RECORD}")
        if len(buf) - pos - 5 < length:
            # Refuse now a hello that could never fit, rather than wait for it.
            if need is None:
                partial = out + buf[pos + 5: pos + 5 + length]
                if len(partial) >= 4 and 4 + int.from_bytes(partial[1:4], "big") > MAX_HELLO:
                    raise TlsError(f"ClientHello of {4 + int.from_bytes(partial[1:4], 'big')}"
                                   f" bytes is over {MAX_HELLO}")
            return None
        out += buf[pos + 5: pos + 5 + length]
        pos += 5 + length
        records += 1
        if need is None and len(out) >= 4:
            if out[0] != _CLIENT_HELLO:
                raise TlsError(f"handshake type {out[0]} is not a ClientHello")
            need = 4 + int.from_bytes(out[1:4], "big")
            if need > MAX_HELLO:
                raise TlsError(f"ClientHello of {need} bytes is over {MAX_HELLO}")
    if len(out) > need:
        # A second handshake message in the same flight: a client never sends one.
        raise TlsError("bytes after the ClientHello in its records")
    return bytes(out)


def parse_client_hello(buf: bytes) -> ClientHello | None:
    """The hello at the start of buf; None if buf does not hold all of it yet.

    Raises TlsError for malformed input, for a server_name that is not a
    valid host name (NUL and the like: canonical_name's rules), and for a
    hello over MAX_HELLO bytes.
    """
    msg = _handshake_bytes(buf[:MAX_BUFFER])
    if msg is None:
        if len(buf) >= MAX_BUFFER:
            raise TlsError(f"no complete ClientHello in the first {MAX_BUFFER} bytes")
        return None
    r = _Reader(msg[4:], "ClientHello")
    r.take(2)  # legacy_version: TLS 1.3 hellos say 1.2 here; the record layer checked 3.x
    r.take(32)  # random
    session = r.vector(1, "session id")
    if session.left() > 32:
        raise TlsError("session id longer than 32 bytes")
    suites = r.vector(2, "cipher suites")
    if suites.left() == 0 or suites.left() % 2:
        raise TlsError("cipher suite list is empty or odd")
    if r.vector(1, "compression methods").left() == 0:
        raise TlsError("no compression method")
    if r.left() == 0:
        return ClientHello(sni=None, ech=False)  # a hello without extensions (pre-TLS 1.2)
    exts = r.vector(2, "extensions")
    if r.left():
        raise TlsError("bytes after the extensions")
    seen: set[int] = set()
    sni: str | None = None
    while exts.left():
        etype = exts.uint(2)
        body = exts.vector(2, f"extension {etype:#06x}")
        if etype in seen:
            raise TlsError(f"extension {etype:#06x} appears twice")  # RFC 8446 4.2
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            sni = _server_name(body)
    return ClientHello(sni=sni, ech=EXT_ECH in seen)


def _server_name(body: _Reader) -> str:
    names = body.vector(2, "server name list")
    if body.left():
        raise TlsError("bytes after the server name list")
    found: str | None = None
    while names.left():
        ntype = names.uint(1)
        raw = names.vector(2, "server name").rest()
        if ntype != _HOST_NAME:
            raise TlsError(f"server name type {ntype} is not host_name")
        if found is not None:
            raise TlsError("two host names in server_name")  # RFC 6066 3
        try:
            found = canonical_name(raw)
        except ValueError as err:
            raise TlsError(f"TLS SNI is not a valid host name: {err}") from None
    if found is None:
        raise TlsError("empty server_name extension")
    return found

