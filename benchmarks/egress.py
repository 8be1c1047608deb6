"""Egress allowlist: what the service adds to a connection's set-up, and its bulk throughput.

An agent-like client in a network namespace built as netns.py builds it
(the contract's nft ruleset; tests/unit/egressnet.py) reaches a server on
the host's loopback through the real egress service (the synthetic address
of an allowlisted name, redirected to the capture listener, SNI checked,
pumped with splice(2)); beside it, the same client work straight to the
server over the host's loopback.

* set-up: connect, send a real ClientHello, get its echo back (one round
  trip), close; median / p99 / max in ms, and the difference of medians;
* bulk: one flow sends N MiB to a server that discards them and answers
  when it has all; MB/s.

Targets (issue 13): <= 1 ms added per connection, >= 500 MB/s. Prints a
table, writes JSON to benchmarks/results/egress.json. Needs root. Never
asserts a time.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import dnslib
from common import add_smoke_flag, need_root, print_head, summary, write_json

from daemon.egress.allowlist import Allowlist
from daemon.egress.control import EgressService
from tests.unit.dnsserver import RecordingDns
from tests.unit.echoserver import Echo
from tests.unit.egressnet import AgentNetns
from tests.unit.tlshello import openssl_hello

BLOCK = 4 << 20


class Sink:
    """Reads `expect` bytes per connection, discarding them, then answers b"k"."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.expect = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = bytearray(BLOCK)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                got = 0
                while got < self.expect:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got += n
                conn.sendall(b"k")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join()


def _setup_times(connect: Callable[[], socket.socket], hello: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = connect()
        s.sendall(hello)
        got = 0
        while got < len(hello):
            got += len(s.recv(65536))
        out.append((time.perf_counter() - t0) * 1e3)
        s.close()
    return out


def _bulk(connect: Callable[[], socket.socket], sink: Sink, mib: int, hello: bytes) -> float:
    # The flow opens as TLS does (the service checks the SNI), then bulk.
    sink.expect = len(hello) + (mib << 20)
    data = memoryview(b"x" * BLOCK)
    s = connect()
    t0 = time.perf_counter()
    s.sendall(hello)
    for _ in range((mib << 20) // BLOCK):
        s.sendall(data)
    assert s.recv(1) == b"k"
    took = time.perf_counter() - t0
    s.close()
    return (mib << 20) / took / 1e6


def run(connects: int, mib: int, reps: int) -> list[dict[str, Any]]:
    hello = openssl_hello("bench.test")
    with RecordingDns({"bench.test": "127.0.0.1"}) as dns, Echo() as echo, \
            AgentNetns() as ns:
        sink = Sink()
        svc = EgressService(resolvers=[dns.addr], private_ok=["127.0.0.0/8"],
                            on_event=lambda e: None)
        svc.start()
        try:
            allow = Allowlist.of([f"bench.test:{echo.port}", f"bench.test:{sink.port}"])
            svc.add("bench", "bench", allow, ns.fds())
            q = dnslib.DNSRecord.question("bench.test")
            u = ns.udp()
            u.settimeout(5)
            ns.run(lambda: u.sendto(q.pack(), ("8.8.8.8", 53)))
            synth = str(dnslib.DNSRecord.parse(u.recv(4096)).rr[0].rdata)
            u.close()

            def direct(port: int) -> Callable[[], socket.socket]:
                def go() -> socket.socket:
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return s
                return go

            def through(port: int) -> Callable[[], socket.socket]:
                def go() -> socket.socket:
                    s = ns.connect(synth, port, timeout=10)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return s
                return go

            rows: list[dict[str, Any]] = []
            for path, mk in (("direct", direct), ("allowlist", through)):
                times = _setup_times(mk(echo.port), hello, connects)
                rates = [_bulk(mk(sink.port), sink, mib, hello) for _ in range(reps)]
                rows.append({"path": path, "setup_ms": summary(times),
                             "bulk_mb_s": summary(rates), "connects": connects, "mib": mib})
        finally:
            svc.stop()
            sink.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    add_smoke_flag(ap)
    args = ap.parse_args()
    need_root("egress")
    if args.smoke:
        args.connects, args.mib, args.reps = 20, 64, 1
    rows = run(args.connects, args.mib, args.reps)
    print_head(f"{'path':<10} {'set-up ms median / p99 / max':>30} {'bulk MB/s median':>17}")
    for r in rows:
        s = r["setup_ms"]
        print(f"{r['path']:<10} {s['median']:9.3f} / {s['p99']:8.3f} / {s['max']:8.3f} "
              f"{r['bulk_mb_s']['median']:17.0f}")
    added = rows[1]["setup_ms"]["median"] - rows[0]["setup_ms"]["median"]
    print(f"added per connection (median): {added:.3f} ms (target <= 1 ms); "
          f"throughput through the allowlist: {rows[1]['bulk_mb_s']['median']:.0f} MB/s "
          "(target >= 500)")
    path = write_json("egress", [*rows, {"added_setup_ms_median": added}], smoke=args.smoke)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
