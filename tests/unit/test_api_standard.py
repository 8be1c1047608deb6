"""Health checking and reflection on a real gRPC server over a Unix socket, without a daemon."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daemon.api import standard
from tests.harness import wait_for

SERVICE = "agentd.v1.Agentd"


class Tick:
    """A stand-in enforcement loop: its last tick is whatever the test says."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def __call__(self) -> float:
        return self.at


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[grpc.Channel, standard.HealthWatch, Tick]]:
    tick = Tick()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    watch = standard.HealthWatch([SERVICE], tick, stall_after_s=0.5)
    watch.add_to(server)
    standard.add_reflection(server, [SERVICE, standard.HEALTH_SERVICE], limit=2)
    server.add_insecure_port(f"unix:{tmp_path / 's.sock'}")
    server.start()
    watch.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}")
    yield channel, watch, tick
    channel.close()
    watch.stop()
    server.stop(None).wait(5)


def _status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_not_serving_while_the_loop_stalls_and_for_good_after_stop(
    served: tuple[grpc.Channel, standard.HealthWatch, Tick],
) -> None:
    channel, watch, tick = served
    assert _status(channel, SERVICE) == standard.SERVING
    assert _status(channel, "") == standard.SERVING
    tick.at = time.monotonic() - 10  # the loop stopped ticking
    assert wait_for(lambda: _status(channel, SERVICE) == standard.NOT_SERVING, timeout=5)
    assert _status(channel, "") == standard.NOT_SERVING
    tick.at = time.monotonic() + 3600  # ticking again
    assert wait_for(lambda: _status(channel, SERVICE) == standard.SERVING, timeout=5)
    watch.stop()
    assert _status(channel, SERVICE) == standard.NOT_SERVING
    time.sleep(0.6)  # past a check: nothing turns it back on
    assert _status(channel, SERVICE) == standard.NOT_SERVING


def test_reflection_streams_are_capped(
    served: tuple[grpc.Channel, standard.HealthWatch, Tick],
) -> None:
    channel, _, _ = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    held: list[tuple[queue.Queue[object], Any]] = []
    stop = object()

    def requests(q: queue.Queue[object]) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        while (item := q.get(timeout=30)) is not stop:
            yield item  # type: ignore[misc]

    try:
        for _ in range(2):  # the limit: each stays open, holding a worker
            q: queue.Queue[object] = queue.Queue()
            q.put(list_services)
            call = stub.ServerReflectionInfo(requests(q), timeout=30)
            first = next(call)
            assert SERVICE in {s.name for s in first.list_services_response.service}
            held.append((q, call))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([list_services]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for q, call in held:
            q.put(stop)
            call.cancel()

    # Slots come back when the streams end.
    def works() -> bool:
        try:
            list(stub.ServerReflectionInfo(iter([list_services]), timeout=10))
            return True
        except grpc.RpcError:
            return False

    assert wait_for(works, timeout=10, interval=0.1)
