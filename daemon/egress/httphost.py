"""The target of an HTTP/1.x request head (RFC 9112), read strictly and never trusted.

Used on captured plain-HTTP flows (the Host header must name the flow's
name) and on the explicit proxy listener (CONNECT host:port, absolute-form
GET http://host/...). Whatever two HTTP parsers could read differently is
refused: bare CR or LF, obsolete line folding, a space before a header's
colon, two Host headers, an absolute-form target whose authority differs
from the Host header (request smuggling's tools, RFC 9112 3.2, 5.1, 11.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.egress.allowlist import canonical_name

MAX_HEAD = 16 * 1024  # nginx's default large_client_header_buffers line size is 8 KiB
_MAX_HEADERS = 100
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 5.6.2
_METHOD_START = re.compile(rb"[A-Z]{1,16}( |\Z)")
_VERSION = re.compile(rb"HTTP/1\.[01]\Z")
_PORT = re.compile(rb"[0-9]{1,5}\Z")


class HttpError(ValueError):
    """Not a well-formed HTTP/1.x request head (the flow is denied)."""


@dataclass(frozen=True)
class Request:
    """What the proxy needs from a request head."""

    method: str
    host: str | None  # canonical name from the target's authority or the Host header
    port: int | None  # the port written there, if any
    absolute: bool  # absolute-form target (http://host/...): an explicit-proxy request
    head_len: int  # bytes up to and including the blank line


def may_be_http(first: bytes) -> bool:
    """Whether these first bytes can begin a request line ("GET ", "CONNECT ", ...)."""
    return not first or bool(_METHOD_START.match(first[:17]))


def is_http_request_line(buf: bytes) -> bool | None:
    """Whether buf's first line ends in " HTTP/1.x" (None: the line has not all come).

    Tells HTTP, which is then parsed strictly, from another protocol whose
    first word happens to be in capitals ("SET k v" to a Redis).
    """
    end = buf.find(b"\r\n", 0, MAX_HEAD)
    if end < 0:
        return None if len(buf) < MAX_HEAD else False
    return bool(_VERSION.match(buf[:end].rsplit(b" ", 1)[-1]))


def split_authority(raw: bytes) -> tuple[str, int | None]:
    """`host`, `host:port` or `[v6]:port` as (canonical host, port). Raises HttpError.

    An IPv6 literal comes back as its text, unbracketed; canonical_name()
    refuses anything else odd, NUL and `%00` alike (the latter is no name).
    """
    if raw.startswith(b"["):
        end = raw.find(b"]")
        if end < 0:
            raise HttpError(f"authority {raw!r}: unclosed '['")
        host_b, rest = raw[1:end], raw[end + 1:]
        if rest and not rest.startswith(b":"):
            raise HttpError(f"authority {raw!r}: bytes after ']'")
        port_b = rest[1:] if rest else None
        host = host_b.decode("ascii", "replace").lower()
        if not re.fullmatch(r"[0-9a-f:.]+", host):
            raise HttpError(f"authority {raw!r}: not an IPv6 literal")
    else:
        host_b, colon, port_b_ = raw.rpartition(b":")
        if not colon:
            host_b, port_b_ = raw, b""
        port_b = port_b_ if colon else None
        try:
            host = canonical_name(host_b)
        except ValueError as err:
            raise HttpError(f"host {host_b!r}: {err}") from None
    port: int | None = None
    if port_b is not None:
        if not _PORT.match(port_b) or not 1 <= int(port_b) <= 65535:
            raise HttpError(f"authority {raw!r}: bad port")
        port = int(port_b)
    return host, port


def parse_request_head(buf: bytes) -> Request | None:
    """The request head at the start of buf; None if it has not all arrived.

    Raises HttpError for a malformed head, a head over MAX_HEAD bytes, or a
    host that is not a valid name.
    """
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        if len(buf) >= MAX_HEAD:
            raise HttpError(f"request head longer than {MAX_HEAD} bytes")
        # Refuse now what could never become valid, rather than wait for it.
        _check_line_ends(buf, partial=True)
        return None
    head = buf[:end]
    _check_line_ends(head, partial=False)
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _VERSION.match(parts[2]):
        raise HttpError(f"request line {lines[0][:80]!r} is not 'METHOD TARGET HTTP/1.x'")
    method, target = parts[0].decode("ascii"), parts[1]
    if len(lines) - 1 > _MAX_HEADERS:
        raise HttpError(f"more than {_MAX_HEADERS} header lines")
    host_headers: list[bytes] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpError("obsolete line folding (RFC 9112 5.2)")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise HttpError(f"header line {line[:80]!r} is malformed")
        if name.lower() == b"host":
            host_headers.append(value.strip(b" \t"))
    if len(host_headers) > 1:
        raise HttpError("two Host headers")
    header_host = split_authority(host_headers[0]) if host_headers else None
    absolute = False
    if method == "CONNECT":
        host, port = split_authority(target)
        if port is None:
            raise HttpError("CONNECT target needs a port")
    elif target.lower().startswith(b"http://"):
        absolute = True
        authority = target[7:].split(b"/", 1)[0].split(b"?", 1)[0]
        if b"@" in authority:
            raise HttpError("user information in the target")  # RFC 9110 4.2.4
        host, port = split_authority(authority)
        if header_host is not None and header_host[0] != host:
            raise HttpError(f"Host header {header_host[0]} differs from the target's {host}")
    elif target.startswith(b"/") or target == b"*":
        if header_host is None:
            raise HttpError("no Host header")
        host, port = header_host
    else:
        raise HttpError(f"request target {target[:80]!r} is not origin or absolute form")
    return Request(method=method, host=host, port=port, absolute=absolute, head_len=end + 4)


def _check_line_ends(head: bytes, *, partial: bool) -> None:
    # A lone CR or LF ends a line for some parsers and not for others. A
    # partial head may end in the CR of a CRLF still to come.
    stripped = head.replace(b"\r\n", b"")
    if partial and stripped.endswith(b"\r"):
        stripped = stripped[:-1]
    if b"\r" in stripped or b"\n" in stripped:
        raise HttpError("bare CR or LF in the request head")
    if b"\0" in head:
        raise HttpError("NUL in the request head")
