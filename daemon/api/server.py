"""The gRPC servicer and the control socket.

Errors are mapped to gRPC statuses here and only here. A handler never lets
an exception escape: the daemon must never crash on input.
"""

from __future__ import annotations

import grp
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc
from agentd.v1 import agentd_pb2, agentd_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.api import convert, logs, standard
from daemon.errors import AgentdError, InvalidArgument
from daemon.events import RING_SIZE, Event, EventBus
from daemon.supervisor.agent import Agent
from daemon.supervisor.core import Supervisor

log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC's own limit sits well above the daemon's envelope limit, so an
# oversized envelope reaches the verifier and gets a clear, audited refusal;
# only absurd sizes are cut off by gRPC itself.
GRPC_MAX_MESSAGE = 4 * 1024 * 1024
# An Events stream holds a worker of the pool for its whole life; this many
# at most, well under the pool's 64, so followers never starve a Kill.
MAX_EVENT_STREAMS = 16
# Log followers, likewise (agentctl logs -f); a tail alone is quick and not counted.
MAX_LOG_FOLLOWERS = 16
# How often a follower with nothing to send checks that its client is still there.
EVENTS_POLL_S = 0.5
AGENTD_SERVICE = agentd_pb2.DESCRIPTOR.services_by_name["Agentd"].full_name


class Servicer(agentd_pb2_grpc.AgentdServicer):
    def __init__(self, sup: Supervisor, info: Callable[[], agentd_pb2.InfoResponse], *,
                 events: EventBus, max_event_streams: int = MAX_EVENT_STREAMS) -> None:
        self.sup = sup
        self._info = info
        self._events = events
        self._event_slots = threading.BoundedSemaphore(max_event_streams)
        self._max_event_streams = max_event_streams
        self._log_slots = threading.BoundedSemaphore(MAX_LOG_FOLLOWERS)

    def _agent(self, a: Agent) -> agentd_pb2.Agent:
        return convert.agent(a, self.sup.enforcer.remaining(a, "lease"))

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except AgentdError as err:
            context.abort(err.code, err.message)
        except Exception:
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in agentd; see its log")
        raise AssertionError("unreachable")  # context.abort raises

    def Info(
        self, request: agentd_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> agentd_pb2.InfoResponse:
        return self._call(context, self._info)

    def ListAgents(
        self, request: agentd_pb2.ListAgentsRequest, context: grpc.ServicerContext
    ) -> agentd_pb2.ListAgentsResponse:
        return self._call(
            context,
            lambda: agentd_pb2.ListAgentsResponse(
                agents=[self._agent(a) for a in self.sup.agents()]
            ),
        )

    def GetAgent(
        self, request: agentd_pb2.GetAgentRequest, context: grpc.ServicerContext
    ) -> agentd_pb2.Agent:
        return self._call(context, lambda: self._agent(self.sup.get(request.name)))

    def Run(self, request: agentd_pb2.Envelope, context: grpc.ServicerContext) -> agentd_pb2.Agent:
        return self._call(context, lambda: self._agent(self.sup.run(request)))

    def Stop(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.KillResult:
        def go() -> agentd_pb2.KillResult:
            r = self.sup.stop(request)
            return convert.kill_result(r.agent, r.outcome)

        return self._call(context, go)

    def Kill(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.KillResult:
        def go() -> agentd_pb2.KillResult:
            r = self.sup.kill(request)
            return convert.kill_result(r.agent, r.outcome)

        return self._call(context, go)

    def Freeze(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.Agent:
        return self._call(context, lambda: self._agent(self.sup.freeze(request, frozen=True)))

    def Thaw(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.Agent:
        return self._call(context, lambda: self._agent(self.sup.freeze(request, frozen=False)))

    def Renew(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.LeaseResult:
        def go() -> agentd_pb2.LeaseResult:
            r = self.sup.renew(request)
            return agentd_pb2.LeaseResult(
                name=r.agent.name, id=r.agent.id, ttl_ms=r.ttl_ms,
                remaining_ms=r.remaining_s * 1e3,
                expires_at=timestamp(time.time() + r.remaining_s),
            )

        return self._call(context, go)

    def Estop(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.EstopResult:
        def go() -> agentd_pb2.EstopResult:
            r = self.sup.estop(request)
            agents = [convert.kill_result(x.agent, x.outcome) for x in r.results]
            return agentd_pb2.EstopResult(
                agents_killed=len(agents),
                processes_killed=sum(a.processes_killed for a in agents),
                duration_ms=r.duration_ms,
                all_verified_empty=all(a.verified_empty for a in agents),
                agents=agents,
                latched=self.sup.latch.latched,
            )

        return self._call(context, go)

    def Reset(
        self, request: agentd_pb2.Envelope, context: grpc.ServicerContext
    ) -> agentd_pb2.ResetResult:
        def go() -> agentd_pb2.ResetResult:
            principals = self.sup.reset(request)
            return agentd_pb2.ResetResult(latched=self.sup.latch.latched,
                                          principals=list(principals))

        return self._call(context, go)

    def Events(
        self, request: agentd_pb2.EventsRequest, context: grpc.ServicerContext
    ) -> Iterator[agentd_pb2.Event]:
        """The backlog asked for, then (follow) new events until the client goes away.

        A stream holds a worker for its whole life, so at most
        max_event_streams run at once and the rest are refused at once
        (RESOURCE_EXHAUSTED), never queued: followers must never take the
        workers a Kill needs.
        """
        if not self._event_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"agentd serves at most {self._max_event_streams} event streams at once and "
                "all are in use; end a follower (agentctl events -f) or try again later")
        try:
            backlog = min(request.backlog, RING_SIZE)
            with self._events.subscribe(backlog, request.agent or None,
                                        follow=request.follow) as sub:
                # Wake the wait as soon as the client goes away, not at the next poll.
                context.add_callback(sub.close)
                while context.is_active():
                    event = sub.next(timeout=EVENTS_POLL_S)
                    if event is not None:
                        yield _event_message(event)
                    elif sub.closed:
                        return  # backlog only, or the daemon is stopping
        except Exception:
            log.exception("internal error in an event stream")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in agentd; see its log")
        finally:
            self._event_slots.release()

    def Logs(
        self, request: agentd_pb2.LogsRequest, context: grpc.ServicerContext
    ) -> Iterator[agentd_pb2.LogChunk]:
        """The tail of the agent's stdout and stderr, then (follow) new output until it ends.

        Like event streams, at most MAX_LOG_FOLLOWERS follow at once; the
        others are refused at once (RESOURCE_EXHAUSTED), never queued.
        """
        agent = self._call(context, lambda: self.sup.get(request.name))
        if request.follow and not self._log_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"agentd follows at most {MAX_LOG_FOLLOWERS} logs at once and all are in use; "
                "end a follower (agentctl logs -f) or try again later")
        try:
            for name, data in logs.stream(agent, tail_bytes=request.tail_bytes,
                                          follow=request.follow, active=context.is_active):
                yield agentd_pb2.LogChunk(stream=name, data=data)
        except AgentdError as err:
            context.abort(err.code, err.message)
        except Exception:
            log.exception("internal error in a log stream")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in agentd; see its log")
        finally:
            if request.follow:
                self._log_slots.release()


def _event_message(e: Event) -> agentd_pb2.Event:
    return agentd_pb2.Event(
        seq=e.seq, at=timestamp(e.at), kind=e.kind, type=e.type, agent=e.agent,
        agent_id=e.agent_id, message=e.message, fields_json=e.fields_json,
    )


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


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


def serve(
    sup: Supervisor,
    info: Callable[[], agentd_pb2.InfoResponse],
    socket_path: Path,
    group_name: str,
    *,
    events: EventBus,
    workers: int = 64,
) -> ApiServer:
    """Bind the control socket and start serving. The caller waits on the server.

    Besides agentd's own service: gRPC health checking (SERVING while the
    enforcement loop ticks) and server reflection.
    """
    gid = prepare_socket_dir(socket_path, group_name)
    server = grpc.server(
        # Stops wait out their grace period in a worker; a large pool keeps
        # a kill from queueing behind them.
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentd-rpc"),
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
        ],
    )
    agentd_pb2_grpc.add_AgentdServicer_to_server(Servicer(sup, info, events=events), server)
    health = standard.HealthWatch([AGENTD_SERVICE], lambda: sup.enforcer.last_tick)
    health.add_to(server)
    standard.add_reflection(server, [AGENTD_SERVICE, standard.HEALTH_SERVICE])
    # umask before bind: the socket is created with the final mode, never
    # briefly world-accessible.
    old = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o660)
    if gid is not None:
        os.chown(socket_path, 0, gid)
    health.start()
    return ApiServer(server, health, events)


class ApiServer:
    """The running gRPC server, and what stops with it."""

    def __init__(self, server: grpc.Server, health: standard.HealthWatch,
                 events: EventBus) -> None:
        """Made by :func:`serve`."""
        self.server = server
        self._health = health
        self._events = events

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving, as grpc.Server.stop; the returned event is set once stopped.

        First health turns NOT_SERVING and event streams end cleanly, so
        followers do not hold the grace period (and the agents' shutdown
        kills after it) for its whole length.
        """
        self._health.stop()
        self._events.close()
        return self.server.stop(grace)
