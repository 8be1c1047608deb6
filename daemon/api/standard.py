"""The standard gRPC services on the API's loop: health checking and server reflection.

Health (grpc.health.v1): SERVING means a kill would be served now. For the
agentd service, a Check passes through the stop lane before it answers, and
the status is SERVING only while the enforcement loop, which holds every
lease and run-time deadline, has ticked within :data:`STALL_AFTER_S`.

The self-probe (SelfProbe) is a client of the daemon's own socket that calls
that Check every second. It goes the way an on-call engineer's kill goes:
connect, HTTP/2, the API's loop, the stop lane. When it has not been answered
for :data:`PROBE_STALE_S`, the enforcement loop stops the watchdogs'
heartbeats (systemd's WATCHDOG=1, the guardian's pipe): a daemon that would
not serve a kill is killed and restarted, and its agents with it. Fail closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daemon.api.lanes import Lanes

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]

STALL_AFTER_S: Final = 2.0
"""The enforcement loop ticks every 0.1 s; this much silence is a stall."""
_CHECK_EVERY_S: Final = 0.5
PROBE_EVERY_S: Final = 1.0
PROBE_TIMEOUT_S: Final = 3.0
PROBE_STALE_S: Final = 5.0
"""Half of the unit's WatchdogSec=10s: a wedged API is noticed before systemd's deadline."""

HEALTH_SERVICE: Final[str] = health.SERVICE_NAME
REFLECTION_SERVICE: Final[str] = reflection.SERVICE_NAME

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class _Servicer(health_async.HealthServicer):  # type: ignore[misc]
    """The reference aio servicer; a Check of the agentd service goes through the stop lane."""

    def __init__(self, lanes: Lanes, probed: str) -> None:
        super().__init__()
        self._lanes = lanes
        self._probed = probed

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: Context) -> health_pb2.HealthCheckResponse:
        if request.service == self._probed:
            await self._lanes.stop(lambda: None)
        return await super().Check(request, context)


class Health:
    """The health servicer and the task that keeps its status true."""

    def __init__(self, lanes: Lanes, services: Iterable[str], last_tick: Callable[[], float],
                 *, stall_after_s: float = STALL_AFTER_S) -> None:
        names = tuple(services)
        self.servicer = _Servicer(lanes, names[0])
        self._services = ("", *names)
        self._last_tick = last_tick
        self._stall_after = stall_after_s
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Set the first status now, then keep it current from a task on this loop."""
        await self._update()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _update(self) -> None:
        age = time.monotonic() - self._last_tick()
        serving = age <= self._stall_after
        if serving == self._serving:
            return
        if not serving:
            log.error("enforcement loop has not ticked for %.1f s: health NOT_SERVING", age)
        elif self._serving is not None:
            log.warning("enforcement loop ticking again: health SERVING")
        self._serving = serving
        for name in self._services:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_EVERY_S)
            try:
                await self._update()
            except Exception:  # the health task must outlive a surprise
                log.exception("health check failed")

    async def stop(self) -> None:
        """NOT_SERVING for good (clients stop sending), and end the task."""
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for *service_names* (and itself). Its streams hold no thread."""
    reflection.enable_server_reflection((*service_names, REFLECTION_SERVICE), server)


class SelfProbe:
    """A client of the daemon's own socket: is a kill served now? (See the module doc.)"""

    def __init__(self, socket_path: Path, service: str, *, every_s: float = PROBE_EVERY_S,
                 stale_s: float = PROBE_STALE_S) -> None:
        self._target = f"unix:{socket_path}"
        self._service = service
        self._every, self._stale = every_s, stale_s
        self.last_ok = time.monotonic()  # the server answered just before this was made
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentd-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=PROBE_TIMEOUT_S + 1)

    def fresh(self) -> bool:
        """Answered within the last stale_s seconds."""
        return time.monotonic() - self.last_ok < self._stale

    def _run(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(self._every):
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=self._service),
                               timeout=PROBE_TIMEOUT_S)
                except grpc.RpcError as err:
                    log.warning("API self-probe failed: %s", err.code().name)
                    continue
                self.last_ok = time.monotonic()
