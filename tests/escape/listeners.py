"""Listeners the test runs on the host's loopback, to see whether an agent reaches them.

TCP on 127.0.0.1 (and ::1 when the host has it), UDP on 127.0.0.1, an
abstract Unix socket in the host's network namespace, and optionally a Unix
socket file (mode 0666) standing in for a host service's. One thread serves them
all; it stops by itself after its lifetime, and close() stops it sooner.
Loopback only: nothing here ever leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import uuid
from collections import Counter


class HostListeners:
    def __init__(self, lifetime_s: float = 90.0, socket_path: str = "") -> None:
        self.abstract_name = f"agentd-escape-{uuid.uuid4().hex[:8]}"
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.tcp6: socket.socket | None = None
        with contextlib.suppress(OSError):
            self.tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(b"\0" + self.abstract_name.encode())
        self.unix.listen()
        self.socket_path = socket_path
        self.path_socket: socket.socket | None = None
        if socket_path:
            self.path_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.path_socket.bind(socket_path)
            os.chmod(socket_path, 0o666)
            self.path_socket.listen()
        self.heard: Counter[str] = Counter()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime_s
        self._thread = threading.Thread(target=self._serve, name="escape-listeners",
                                        daemon=True)
        self._thread.start()

    @property
    def ports(self) -> dict[str, object]:
        return {"tcp_port": self.tcp.getsockname()[1],
                "tcp6_port": self.tcp6.getsockname()[1] if self.tcp6 else 0,
                "udp_port": self.udp.getsockname()[1],
                "abstract": [self.abstract_name]}

    def _serve(self) -> None:
        labels = {self.tcp: "tcp", self.udp: "udp", self.unix: "abstract"}
        if self.tcp6 is not None:
            labels[self.tcp6] = "tcp6"
        if self.path_socket is not None:
            labels[self.path_socket] = "path"
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            ready, _, _ = select.select(list(labels), [], [], 0.1)
            for sock in ready:
                label = labels[sock]
                with contextlib.suppress(OSError):
                    if label == "udp":
                        sock.recvfrom(4096)
                    else:
                        conn, _ = sock.accept()
                        conn.close()
                    self.heard[label] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in (self.tcp, self.tcp6, self.udp, self.unix, self.path_socket):
            if sock is not None:
                sock.close()
        if self.socket_path:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
