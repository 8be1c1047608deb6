"""Load that a client can put on agentd's socket without a key: for tests and benchmarks.

* StalledCalls: calls whose headers arrive but whose request never does;
* keyless_envelope / flood: envelopes with garbage signatures, as fast as
  one process can send them, bounded in time and in count. `python -m
  tests.load flood SOCKET SECONDS MAX` runs one flooding process and prints
  its counts as JSON, so that a few of them load more than one GIL can.

Everything here is bounded and cleans up after itself: channels are closed
and the threads the gRPC client spends on request iterators are released.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from agentd.dsse import COMMAND_PAYLOAD_TYPE
from agentd.v1 import agentd_pb2

REPO = Path(__file__).resolve().parent.parent
KILL = "/agentd.v1.Agentd/Kill"
# The server allows 100 concurrent streams per connection (server.py
# MAX_STREAMS_PER_CONNECTION); calls beyond that would wait in the client and
# never reach the daemon. 84 a connection leaves room.
CALLS_PER_CHANNEL = 84


def channel(socket: Path, i: int = 0) -> grpc.Channel:
    """A channel with a connection of its own (channels with equal options share one)."""
    return grpc.insecure_channel(f"unix:{socket}", options=[
        ("grpc.channel_id", i), ("grpc.use_local_subchannel_pool", 1)])


class StalledCalls:
    """n Kill calls whose request never arrives, over enough connections to reach the server.

    The sync client consumes a request iterator on a thread of its own; each
    iterator here blocks until close(), so each call has sent its headers and
    nothing else. futures: one per call, done when the server ends it.
    """

    def __init__(self, socket: Path, n: int) -> None:
        self._release = threading.Event()
        nchan = max(1, -(-n // CALLS_PER_CHANNEL))
        self.channels = [channel(socket, 1000 + i) for i in range(nchan)]
        self.futures: list[grpc.Future] = []
        try:
            for i in range(n):
                call = self.channels[i % nchan].stream_unary(
                    KILL, request_serializer=agentd_pb2.Envelope.SerializeToString,
                    response_deserializer=agentd_pb2.KillResult.FromString)
                self.futures.append(call.future(self._never()))
        except BaseException:
            self.close()
            raise

    def _never(self) -> Iterator[agentd_pb2.Envelope]:
        self._release.wait()
        yield from ()

    def pending(self) -> int:
        return sum(1 for f in self.futures if not f.done())

    def codes(self) -> Counter[grpc.StatusCode]:
        """Status codes of the calls that have ended (the server's, or CANCELLED by us)."""
        out: Counter[grpc.StatusCode] = Counter()
        for f in self.futures:
            if f.done():
                out[f.code()] += 1
        return out

    def close(self) -> None:
        self._release.set()
        for f in self.futures:
            f.cancel()
        for ch in self.channels:
            ch.close()


def keyless_envelope(i: int = 0) -> agentd_pb2.Envelope:
    """An envelope with 8 signatures under random key ids that no daemon trusts."""
    env = agentd_pb2.Envelope(payload=os.urandom(64) + i.to_bytes(8, "big"),
                              payload_type=COMMAND_PAYLOAD_TYPE)
    for _ in range(8):
        env.signatures.add(keyid=os.urandom(32), sig=bytes(64))
    return env


def flood(socket: Path, seconds: float, max_count: int, *, in_flight: int = 8) -> dict[str, Any]:
    """Send keyless kills for `seconds` or `max_count` calls, whichever ends first.

    Keeps in_flight calls outstanding on one connection. Returns
    {"sent": N, "codes": {CODE_NAME: count}, "seconds": elapsed}.
    """
    ch = channel(socket, os.getpid())
    kill = ch.unary_unary(KILL, request_serializer=agentd_pb2.Envelope.SerializeToString,
                          response_deserializer=agentd_pb2.KillResult.FromString)
    codes: Counter[str] = Counter()
    sent = 0
    window: list[grpc.Future] = []
    t0 = time.monotonic()
    end = t0 + seconds
    try:
        while (sent < max_count and time.monotonic() < end) or window:
            while sent < max_count and len(window) < in_flight and time.monotonic() < end:
                window.append(kill.future(keyless_envelope(sent), timeout=30))
                sent += 1
            f = window.pop(0)
            try:
                f.result()
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
    finally:
        ch.close()
    return {"sent": sent, "codes": dict(codes), "seconds": time.monotonic() - t0}


class FloodProcesses:
    """n processes running flood() against socket; results() waits for them."""

    def __init__(self, socket: Path, n: int, seconds: float, max_count: int) -> None:
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.load", "flood", str(socket), str(seconds),
             str(max_count)], cwd=REPO, stdout=subprocess.PIPE, text=True)
            for _ in range(n)]

    def results(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            stdout, _ = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"flood process exited {p.returncode}")
            out.append(json.loads(stdout))
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[0] != "flood":
        sys.exit("usage: python -m tests.load flood SOCKET SECONDS MAX_COUNT")
    print(json.dumps(flood(Path(argv[1]), float(argv[2]), int(argv[3]))))


if __name__ == "__main__":
    _main(sys.argv[1:])
