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
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from tests.unit.dnsserver import RecordingDns

ZONE = "agentd.test"  # its servers' names resolve to 127.0.0.1
SERVERS = ("http", "echo", "other", "tls")


@dataclass
class Heard:
    queries: list[str] = field(default_factory=list)  # names the DNS server was asked
    connections: dict[str, int] = field(default_factory=dict)  # server -> accepted
    closed: dict[str, int] = field(default_factory=dict)  # server -> connections that ended


class Upstream:
    """A DNS server (UDP and TCP) and TCP servers: http, echo, tls, other."""

    def __init__(self) -> None:
        self.heard = Heard()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self.dns = RecordingDns({f"{n}.{ZONE}": "127.0.0.1" for n in SERVERS}).__enter__()
        self.dns_port = self.dns.port
        self.ports: dict[str, int] = {}
        for name in ("http", "echo", "other"):
            self.ports[name] = self._tcp(name)
        self._tmp = tempfile.TemporaryDirectory(prefix="agentd-t-tls-")
        self.ports["tls"] = self._tcp("tls", tls=self._tls_context())

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
            return Heard(list(self.dns.seen), dict(self.heard.connections),
                         dict(self.heard.closed))

    def close(self) -> None:
        self.dns.__exit__(None, None, None)
        self._stop.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=2)
        self._tmp.cleanup()
