"""A network namespace like the one netns.py builds for an agent, for the egress tests.

A thread unshares CLONE_NEWNET (only that thread moves: setns(2) and
unshare(2) act on the calling thread), brings lo up, routes everything to
lo, loads the contract's nft ruleset, creates the listening sockets the
daemon would hand the service, and then runs callables for the test in
that namespace: whatever socket it creates stays in the namespace.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

RULESET = """
table inet agentd {
  chain nat_out { type nat hook output priority -100; policy accept;
    udp dport 53 redirect to :53
    tcp dport 53 redirect to :15001
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :15001
  }
  chain filter_out { type filter hook output priority 0; policy drop;
    ct state established,related accept
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
  }
}
"""


def _listener(family: socket.AddressFamily, addr: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen(512)
    return s


def _udp(family: socket.AddressFamily, addr: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 53))
    return s


class AgentNetns:
    """The namespace and its five sockets (role -> socket), as the daemon makes them."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="agent-netns", daemon=True)
        self.socks: dict[str, socket.socket] = {}

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            try:
                fut.set_result(fn())
            except BaseException as err:
                fut.set_exception(err)

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on the namespace's thread; its result or its exception."""
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        return fut.result(timeout=60)

    def _setup(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        # Children forked from this thread inherit its namespace.
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        # "src": without it a connect to a redirected address goes out from
        # 0.0.0.0, and the listener's answers to 0.0.0.0 never arrive (the
        # handshake and the first bytes pass, then the flow stalls).
        for ip, src in (("-4", "127.0.0.1"), ("-6", "::1")):
            subprocess.run(["ip", ip, "route", "add", "default", "dev", "lo", "src", src],
                           check=True)
        subprocess.run(["nft", "-f", "-"], input=RULESET.encode(), check=True)
        self.socks = {
            "tcp4": _listener(socket.AF_INET, "127.0.0.1", 15001),
            "tcp6": _listener(socket.AF_INET6, "::1", 15001),
            "dns4": _udp(socket.AF_INET, "127.0.0.1"),
            "dns6": _udp(socket.AF_INET6, "::1"),
            "proxy": _listener(socket.AF_INET, "127.0.0.1", 3128),
        }

    def fds(self) -> dict[str, int]:
        return {role: s.fileno() for role, s in self.socks.items()}

    def connect(self, addr: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from inside the namespace (raises OSError as connect does)."""
        def go() -> socket.socket:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect((addr, port))
            except BaseException:
                s.close()
                raise
            return s
        return self.run(go)

    def udp(self, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        return self.run(lambda: socket.socket(family, socket.SOCK_DGRAM))

    def __enter__(self) -> AgentNetns:
        self._thread.start()
        try:
            self.run(self._setup)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()
        self._jobs.put(None)
        self._thread.join()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def netns_count() -> int:
    """Distinct network namespaces in use by this process's threads (for the leak check)."""
    seen = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            seen.add(os.readlink(f"/proc/self/task/{tid}/ns/net"))
        except OSError:
            continue
    return len(seen)
