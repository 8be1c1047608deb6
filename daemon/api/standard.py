"""The standard gRPC services: health checking and server reflection.

Health (grpc.health.v1): SERVING means the control socket answers *and* the enforcement loop, which
holds every lease and run-time deadline, has ticked within
:data:`STALL_AFTER_S`. The loop cannot report its own stall (a stalled loop
calls nothing), so a separate thread reads its ``last_tick`` and flips the
status. Watch streams use grpcio-health-checking's non-blocking mode: they
hold no worker of the server's pool, which the kill path needs.

Reflection (grpc.reflection.v1alpha, what grpcurl and grpc_cli use) is a
bidirectional stream that holds a worker for as long as the client keeps it
open; at most :data:`MAX_REFLECTION_STREAMS` run at once, so idle reflection
clients can never take the workers a Kill needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

log = logging.getLogger(__name__)

STALL_AFTER_S: Final = 2.0
"""The enforcement loop ticks every 0.1 s; this much silence is a stall."""
_CHECK_EVERY_S: Final = 0.5
MAX_REFLECTION_STREAMS: Final = 4

HEALTH_SERVICE: Final[str] = health.SERVICE_NAME
REFLECTION_SERVICE: Final[str] = reflection.SERVICE_NAME

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWatch:
    """The health servicer and the thread that keeps its status true."""

    def __init__(self, services: Iterable[str], last_tick: Callable[[], float], *,
                 stall_after_s: float = STALL_AFTER_S) -> None:
        """Report *services* (and the server as a whole, "") from *last_tick* (monotonic)."""
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self._services = ("", *services)
        self._last_tick = last_tick
        self._stall_after = stall_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentd-health", daemon=True)
        self._serving: bool | None = None

    def add_to(self, server: grpc.Server) -> None:
        """Register the health service on *server*."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def start(self) -> None:
        """Set the first status now, then keep it current from a thread."""
        self._update()
        self._thread.start()

    def _update(self) -> None:
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
            self.servicer.set(name, SERVING if serving else NOT_SERVING)

    def _run(self) -> None:
        while not self._stop.wait(_CHECK_EVERY_S):
            try:
                self._update()
            except Exception:  # the health thread must outlive a surprise
                log.exception("health check failed")

    def stop(self) -> None:
        """NOT_SERVING for good (clients stop sending), and end the thread."""
        self.servicer.enter_graceful_shutdown()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)


class _CappedReflection:
    """The reference reflection servicer, behind a cap on concurrent streams."""

    def __init__(self, service_names: Iterable[str], limit: int) -> None:
        self._inner = reflection.ReflectionServicer(tuple(service_names))
        self._slots = threading.BoundedSemaphore(limit)
        self._limit = limit

    def ServerReflectionInfo(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Answer reflection requests, if one of the stream slots is free."""
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"agentd serves at most {self._limit} reflection streams at once; "
                          "try again when one ends")
        try:
            # cast: grpc-stubs declares this generator as returning None.
            answer = cast(Callable[..., Iterator[Any]], self._inner.ServerReflectionInfo)
            yield from answer(request_iterator, context)
        finally:
            self._slots.release()


def add_reflection(server: grpc.Server, service_names: Iterable[str],
                   limit: int = MAX_REFLECTION_STREAMS) -> None:
    """Serve reflection for *service_names* (and itself) on *server*, at most *limit* at once."""
    names = (*service_names, REFLECTION_SERVICE)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _CappedReflection(names, limit), server)
