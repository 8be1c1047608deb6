"""The control socket: a grpc.aio server on a thread and an asyncio loop of its own.

What a client can hold, and for how long (issue 10, FIELD-NOTES "Serving the API"):

* a call whose request never arrives: RECEIVE_DEADLINE_S, then it is ended.
  Unary RPCs are served as client-streaming ones (the same bytes on the wire)
  so that the handler runs when the call's headers arrive and can put a
  deadline on the request message itself;
* streams on one connection: MAX_STREAMS_PER_CONNECTION;
* connections: at most MAX_CONNECTIONS (and never more than a tenth of the
  daemon's file-descriptor limit: agents' pidfds, pipes and cgroup files must
  always find a descriptor); a connection with no call for IDLE_MS is closed;
* a stop's grace period, a follower that does not read: a coroutine each,
  no thread (daemon.api.lanes).

Beside it, on the same loop, the emergency socket: a second server that
serves stop, kill, estop, freeze and info only, behind a directory of its
own group (stop_socket_group: on-call humans). Whoever can reach the control
socket (agents' supervisors, control planes, tools: the agentd group) can
fill its connections or its streams; they cannot reach this one, so a signed
stop always has a way in. Both serve the same lanes: a stop from either
socket runs on the stop lane.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import resource
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from agentd.v1 import agentd_pb2

from daemon.api import standard
from daemon.api.lanes import Lanes
from daemon.api.servicer import Context, Servicer
from daemon.errors import InvalidArgument

log = logging.getLogger(__name__)

# gRPC's own limit sits above the daemon's envelope limit (64 KiB by
# default), so a somewhat oversized envelope reaches the verifier and gets a
# clear, audited refusal; larger ones are cut off by gRPC itself. Not much
# above: each call waiting for verification holds its message in memory.
GRPC_MAX_MESSAGE = 256 * 1024
# What the daemon sends is its own: a listing of a thousand agents is a few MB.
GRPC_MAX_SEND = 64 * 1024 * 1024
RECEIVE_DEADLINE_S = 5.0
MAX_STREAMS_PER_CONNECTION = 100
IDLE_MS = 10_000
AGENTD_SERVICE = agentd_pb2.DESCRIPTOR.services_by_name["Agentd"].full_name
# What the emergency socket serves, and how much of it.
STOP_METHODS = frozenset({"Kill", "Stop", "Estop", "Freeze", "Cut", "Info"})
STOP_MAX_CONNECTIONS = 64
STOP_MAX_STREAMS = 16


def prepare_socket_dir(socket_path: Path, group_name: str) -> int | None:
    """Create the socket's directory (0750) and remove a stale socket.

    gRPC gives the server no peer uid over a Unix socket (no SO_PEERCRED),
    so the file modes are the only gate: directory 0750 and socket 0660,
    group `agentd` where that group exists. Returns that group's gid.
    """
    try:
        gid: int | None = grp.getgrnam(group_name).gr_gid
    except KeyError:
        gid = None
    d = socket_path.parent
    d.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chmod(d, 0o750)  # noqa: S103 - owner rwx, group (agentd) rx: the gate
    if gid is not None:
        os.chown(d, 0, gid)
    if socket_path.is_socket():
        socket_path.unlink()
    elif socket_path.exists():
        raise InvalidArgument(f"{socket_path} exists and is not a socket; refusing to replace it")
    return gid


def max_connections(wanted: int) -> int:
    """wanted, or a tenth of RLIMIT_NOFILE if that is smaller (at least 16).

    Each connection is a descriptor: a flood of them must never make the next
    pidfd_open, pipe or cgroup open of an agent's launch fail (FIELD-NOTES).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(wanted, soft // 10))


def options(connections: int, streams: int = MAX_STREAMS_PER_CONNECTION) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
        ("grpc.max_send_message_length", GRPC_MAX_SEND),
        ("grpc.max_concurrent_streams", streams),
        ("grpc.max_allowed_incoming_connections", max_connections(connections)),
        ("grpc.max_connection_idle_ms", IDLE_MS),
        # Followers' connections stay open: find dead peers.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def _first(requests: AsyncIterator[Any], context: Context) -> Any:
    """The call's one request message, if it arrives within RECEIVE_DEADLINE_S."""
    try:
        return await asyncio.wait_for(anext(requests), RECEIVE_DEADLINE_S)
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the request did not arrive within {RECEIVE_DEADLINE_S:g} s")
    except StopAsyncIteration:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
    raise AssertionError("unreachable")  # context.abort raises


def _unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def behaviour(requests: AsyncIterator[Any], context: Context) -> Any:
        return await fn(await _first(requests, context), context)
    return behaviour


def _streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def behaviour(requests: AsyncIterator[Any],
                        context: Context) -> AsyncIterator[Any]:
        async for item in fn(await _first(requests, context), context):
            yield item
    return behaviour


def _handlers(servicer: Servicer,
              only: frozenset[str] | None = None) -> grpc.GenericRpcHandler[Any, Any]:
    """Agentd's methods (those in only, if given), with a deadline on each request."""
    service = agentd_pb2.DESCRIPTOR.services_by_name["Agentd"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for m in service.methods:
        if only is not None and m.name not in only:
            continue
        fn = getattr(servicer, m.name)
        req = agentd_pb2.DESCRIPTOR.message_types_by_name.get(m.input_type.name)
        resp = agentd_pb2.DESCRIPTOR.message_types_by_name.get(m.output_type.name)
        assert req is not None and resp is not None, m.full_name
        req_cls = getattr(agentd_pb2, req.name)
        resp_cls = getattr(agentd_pb2, resp.name)
        if m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(fn), request_deserializer=req_cls.FromString,
                response_serializer=resp_cls.SerializeToString)
        else:
            handlers[m.name] = grpc.stream_unary_rpc_method_handler(
                _unary(fn), request_deserializer=req_cls.FromString,
                response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def _listen(server: grpc.aio.Server, socket_path: Path, gid: int | None) -> None:
    """Bind server to socket_path (0660, group gid) and start it."""
    # umask before bind: the socket is created with the final mode, never
    # briefly world-accessible.
    old = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
    finally:
        os.umask(old)
    await server.start()
    os.chmod(socket_path, 0o660)
    if gid is not None:
        os.chown(socket_path, 0, gid)


class ApiServer:
    """The running servers (control and emergency sockets): thread, loop, health and lanes."""

    def __init__(self, servicer: Servicer, lanes: Lanes, *, socket_path: Path, gid: int | None,
                 stop_socket: tuple[Path, int | None] | None = None, max_connections: int = 2048,
                 last_tick: Callable[[], float], on_stop: Callable[[], None]) -> None:
        """stop_socket: the emergency socket's path and group, served by a servicer of its own."""
        self._servicer = servicer
        self._emergency = Servicer(servicer.ctx, lanes, servicer.info, events=servicer.events,
                                   admission=lanes.emergency)
        self.lanes = lanes
        self._socket = socket_path
        self._gid = gid
        self._stop_socket = stop_socket
        self._max_connections = max_connections
        self._last_tick = last_tick
        self._on_stop = on_stop
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="agentd-api", daemon=True)
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._stop_grace: asyncio.Future[float | None] | None = None
        # Through the emergency socket where there is one: a flood of the
        # control socket's connections must not look like a wedged daemon
        # (that would let anyone in its group have every agent killed).
        self.probe = standard.SelfProbe(stop_socket[0] if stop_socket else socket_path,
                                        AGENTD_SERVICE)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        self.probe.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as err:  # reported to start() or logged
            if not self._started.is_set():
                self._error = err
            else:
                log.exception("the API loop ended")
        finally:
            self._started.set()
            self._loop.close()
            self._stopped.set()

    async def _serve(self) -> None:
        self._stop_grace = self._loop.create_future()
        server = grpc.aio.server(options=options(self._max_connections))
        server.add_generic_rpc_handlers((_handlers(self._servicer),))
        health = standard.Health(self.lanes, [AGENTD_SERVICE], self._last_tick)
        health.add_to(server)
        standard.add_reflection(server, [AGENTD_SERVICE, standard.HEALTH_SERVICE])
        servers = [server]
        await _listen(server, self._socket, self._gid)
        if self._stop_socket is not None:
            emergency = grpc.aio.server(options=options(STOP_MAX_CONNECTIONS, STOP_MAX_STREAMS))
            emergency.add_generic_rpc_handlers((_handlers(self._emergency, STOP_METHODS),))
            health.add_to(emergency)  # the self-probe's way in
            await _listen(emergency, *self._stop_socket)
            servers.append(emergency)
        await health.start()
        self._started.set()
        grace = await self._stop_grace
        await health.stop()
        self._on_stop()  # event streams end cleanly before the grace period
        await asyncio.gather(*(s.stop(grace) for s in servers))
        # Stops whose clients went away run to their end (or the shutdown's kill).
        await asyncio.gather(self._servicer.drain(timeout=grace or 0.0),
                             self._emergency.drain(timeout=grace or 0.0))

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; the returned event is set once stopped.

        First health turns NOT_SERVING and event streams end, so followers
        do not hold the grace period (and the agents' shutdown kills after
        it) for its whole length.
        """
        self.probe.stop()

        def set_grace() -> None:
            if self._stop_grace is not None and not self._stop_grace.done():
                self._stop_grace.set_result(grace)

        if not self._stopped.is_set():
            self._loop.call_soon_threadsafe(set_grace)
        return self._stopped
