"""ClientHellos for the egress tests: OpenSSL's own, and hand-built ones to break parsers."""

from __future__ import annotations

import contextlib
import ssl
import struct


def openssl_hello(sni: str | None) -> bytes:
    """The first flight OpenSSL (through Python's ssl) sends for server_hostname=sni."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        obj.do_handshake()
    return out.read()


def ext(etype: int, body: bytes) -> bytes:
    return struct.pack(">HH", etype, len(body)) + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack(">BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack(">H", len(entries)) + entries)


def hello(*extensions: bytes, session: bytes = b"", record_size: int = 1 << 14,
          trailing: bytes = b"", no_ext_block: bool = False) -> bytes:
    """A ClientHello with these extensions, cut into records of record_size bytes."""
    body = (b"\x03\x03" + b"\x11" * 32 + bytes([len(session)]) + session
            + b"\x00\x02\x13\x01" + b"\x01\x00")
    if not no_ext_block:
        exts = b"".join(extensions)
        body += struct.pack(">H", len(exts)) + exts
    body += trailing
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(msg), record_size):
        frag = msg[i: i + record_size]
        out += b"\x16\x03\x01" + struct.pack(">H", len(frag)) + frag
    return out
