"""The world outside an allowlist agent, on the host's loopback: DNS and servers that listen.

Every server records what reached it, so that a test's verdict rests on the
host's own evidence: a lookup of an unlisted name must never reach the DNS
server, a denied connection must never reach its server. Threads end when
the test closes them; every loop is bounded by a socket timeout.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

ZONE = "agentd.test"  # every name under it resolves to 127.0.0.1


@dataclass
class Heard:
    queries: list[str] = field(default_factory=list)  # qnames, as the DNS server got them
    connections: dict[str, int] = field(default_factory=dict)  # server -> accepted
    data: dict[str, bytes] = field(default_factory=dict)  # server -> first bytes received
    closed: dict[str, int] = field(default_factory=dict)  # server -> connections that ended


class Upstream:
    """A DNS server (UDP and TCP) and TCP servers: http, echo, tls, other."""

    def __init__(self) -> None:
        self.heard = Heard()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self.dns_port = self._dns()
        self.ports: dict[str, int] = {}
        for name in ("http", "echo", "other"):
            self.ports[name] = self._tcp(name)
        self._tmp = tempfile.TemporaryDirectory(prefix="agentd-t-tls-")
        self.ports["tls"] = self._tcp("tls", tls=self._tls_context())

    # ------------------------------------------------------------------ DNS
    def _dns(self) -> int:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = int(udp.getsockname()[1])
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))
        tcp.listen()
        for s in (udp, tcp):
            s.settimeout(0.2)
            self._socks.append(s)
        self._spawn(self._dns_udp, udp)
        self._spawn(self._dns_tcp, tcp)
        return port

    def _answer(self, data: bytes) -> bytes:
        try:
            q = DNSRecord.parse(data)
        except Exception:  # garbage: recorded raw, not answered
            with self._lock:
                self.heard.queries.append(repr(data[:80]))
            return b""
        name = str(q.q.qname).rstrip(".").lower()
        with self._lock:
            self.heard.queries.append(name)
        reply = q.reply()
        if name == ZONE or name.endswith("." + ZONE):
            if q.q.qtype == QTYPE.A:
                reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())

    def _dns_udp(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data, peer = s.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            out = self._answer(data)
            if out:
                with contextlib.suppress(OSError):
                    s.sendto(out, peer)

    def _dns_tcp(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError, struct.error):
                    n = struct.unpack("!H", _read_exactly(conn, 2))[0]
                    out = self._answer(_read_exactly(conn, n))
                    if out:
                        conn.sendall(struct.pack("!H", len(out)) + out)

    # ------------------------------------------------------------------ TCP
    def _tls_context(self) -> ssl.SSLContext:
        from datetime import datetime, timedelta

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tls.{ZONE}")])
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"tls.{ZONE}")]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        d = Path(self._tmp.name)
        (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
        return ctx

    def _tcp(self, name: str, tls: ssl.SSLContext | None = None) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.settimeout(0.2)
        self._socks.append(s)
        self._spawn(self._serve, s, name, tls)
        return int(s.getsockname()[1])

    def _serve(self, s: socket.socket, name: str, tls: ssl.SSLContext | None) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.heard.connections[name] = self.heard.connections.get(name, 0) + 1
            self._spawn(self._talk, conn, name, tls)

    def _talk(self, conn: socket.socket, name: str, tls: ssl.SSLContext | None) -> None:
        conn.settimeout(0.5)
        try:
            if tls is not None:
                conn.settimeout(5)
                conn = tls.wrap_socket(conn, server_side=True)
                conn.settimeout(0.5)
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                with self._lock:
                    if name not in self.heard.data:
                        self.heard.data[name] = data[:4096]
                if name == "http":
                    body = b"hello from upstream"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                                 b"\r\n\r\n%s" % (len(body), body))
                    break
                conn.sendall(data)  # echo, tls and other
        except (OSError, ssl.SSLError):
            pass
        finally:
            with self._lock:
                self.heard.closed[name] = self.heard.closed.get(name, 0) + 1
            with contextlib.suppress(OSError):
                conn.close()

    # -------------------------------------------------------------- helpers
    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def snapshot(self) -> Heard:
        with self._lock:
            return Heard(list(self.heard.queries), dict(self.heard.connections),
                         dict(self.heard.data), dict(self.heard.closed))

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=2)
        self._tmp.cleanup()


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise OSError("short read")
        out += chunk
    return out
