"""A DNS server on loopback for the egress tests: answers from a table, records every query."""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType

import dnslib


class RecordingDns:
    """UDP and TCP on 127.0.0.1:PORT; A answers from `zone`, NXDOMAIN otherwise.

    `seen` lists every question name (lower case, no trailing dot) that
    reached it, over either transport: what a test asserts leaked or not.
    """

    def __init__(self, zone: dict[str, str], truncate: bool = False) -> None:
        self.zone = zone
        self.truncate = truncate
        self.seen: list[str] = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen(16)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _reply(self, data: bytes, tcp: bool) -> bytes:
        q = dnslib.DNSRecord.parse(data)
        name = str(q.q.qname).rstrip(".").lower()
        self.seen.append(name)
        r = q.reply()
        if self.truncate and not tcp:
            r.header.tc = 1
        elif name in self.zone and q.q.qtype == dnslib.QTYPE.A:
            r.add_answer(dnslib.RR(q.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(self.zone[name]),
                                   ttl=60))
        elif name not in self.zone:
            r.header.rcode = dnslib.RCODE.NXDOMAIN
        return bytes(r.pack())

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.udp.sendto(self._reply(data, tcp=False), peer)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                n = struct.unpack(">H", conn.recv(2))[0]
                data = b""
                while len(data) < n:
                    data += conn.recv(n - len(data))
                out = self._reply(data, tcp=True)
                conn.sendall(struct.pack(">H", len(out)) + out)

    def __enter__(self) -> RecordingDns:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.udp.close()
        self.tcp.close()
