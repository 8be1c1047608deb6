"""Health and the self-probe on a real grpc.aio server over a Unix socket (no daemon)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daemon.api import standard
from daemon.api.lanes import Lanes
from daemon.audit import AuditLog
from daemon.auth import ReplayCache
from daemon.commands.recorder import Recorder
from daemon.commands.rejections import Rejections
from tests.harness import wait_for

SERVICE = "agentd.v1.Agentd"


class Tick:
    """A stand-in enforcement loop: its last tick is whatever the test says."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def __call__(self) -> float:
        return self.at


class Served:
    """Health and reflection on an aio server in a thread of its own, as the daemon runs them."""

    def __init__(self, tmp: Path) -> None:
        self.socket = tmp / "s.sock"
        self.audit = audit = AuditLog.open(tmp / "audit.log")
        replay = ReplayCache.open(tmp / "replay", now=time.time(), window_s=60, fresh=True)
        self.recorder = Recorder(audit, replay, Rejections())
        self.lanes = Lanes(self.recorder, stop_workers=2)
        self.tick = Tick()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._done: asyncio.Future[None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._done = self.loop.create_future()
        server = grpc.aio.server()
        self.health = standard.Health(self.lanes, [SERVICE], self.tick, stall_after_s=0.5)
        self.health.add_to(server)
        standard.add_reflection(server, [SERVICE, standard.HEALTH_SERVICE])
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        await self.health.start()
        self._started.set()
        await self._done
        await self.health.stop()
        await server.stop(None)

    def stop_health(self) -> None:
        asyncio.run_coroutine_threadsafe(self.health.stop(), self.loop).result(5)

    def close(self) -> None:
        assert self._done is not None
        self.loop.call_soon_threadsafe(self._done.set_result, None)
        self.thread.join(10)
        self.lanes.close()
        self.audit.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[grpc.Channel, Served]]:
    s = Served(tmp_path)
    channel = grpc.insecure_channel(f"unix:{s.socket}")
    yield channel, s
    channel.close()
    s.close()


def _status(channel: grpc.Channel, service: str, timeout: float = 10) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service),
                          timeout=timeout).status)


def test_not_serving_while_the_loop_stalls_and_for_good_after_stop(
        served: tuple[grpc.Channel, Served]) -> None:
    channel, s = served
    assert _status(channel, SERVICE) == standard.SERVING
    assert _status(channel, "") == standard.SERVING
    s.tick.at = time.monotonic() - 60  # the enforcement loop stalls
    assert wait_for(lambda: _status(channel, SERVICE) == standard.NOT_SERVING, timeout=10)
    assert _status(channel, "") == standard.NOT_SERVING
    s.tick.at = time.monotonic() + 3600  # ticking again
    assert wait_for(lambda: _status(channel, SERVICE) == standard.SERVING, timeout=10)
    s.stop_health()
    assert _status(channel, SERVICE) == standard.NOT_SERVING
    s.tick.at = time.monotonic() + 3600
    time.sleep(1.0)  # a check or two of the health task, were it still running
    assert _status(channel, SERVICE) == standard.NOT_SERVING


def test_a_check_of_agentd_waits_for_the_stop_lane_and_the_probe_says_so(
        served: tuple[grpc.Channel, Served]) -> None:
    """Every stop-lane thread busy: the check is not answered, and the probe goes stale."""
    channel, s = served
    s.tick.at = time.monotonic() + 3600
    probe = standard.SelfProbe(s.socket, SERVICE, every_s=0.1, stale_s=1.0)
    probe.start()
    release = threading.Event()
    try:
        assert wait_for(probe.fresh, 10)
        # A kill would wait now: wedge both of the stop lane's threads.
        for _ in range(2):
            s.lanes._stop.submit(release.wait)
        with pytest.raises(grpc.RpcError) as err:
            _status(channel, SERVICE, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _status(channel, "") == standard.SERVING  # the server as such still answers
        assert wait_for(lambda: not probe.fresh(), 15)
        release.set()
        assert wait_for(probe.fresh, 15)
    finally:
        release.set()
        probe.stop()


def test_reflection_lists_the_services(served: tuple[grpc.Channel, Served]) -> None:
    channel, _ = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies: Any = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE, standard.HEALTH_SERVICE, standard.REFLECTION_SERVICE} <= names
