"""The gRPC servicer and the control socket.

Errors are mapped to gRPC statuses here and only here. A handler never lets
an exception escape: the daemon must never crash on input.
"""

from __future__ import annotations

import grp
import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc
from agentd.v1 import agentd_pb2, agentd_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.api import convert
from daemon.errors import AgentdError, InvalidArgument
from daemon.supervisor.agent import Agent
from daemon.supervisor.core import Supervisor

log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC's own limit sits well above the daemon's envelope limit, so an
# oversized envelope reaches the verifier and gets a clear, audited refusal;
# only absurd sizes are cut off by gRPC itself.
GRPC_MAX_MESSAGE = 4 * 1024 * 1024


class Servicer(agentd_pb2_grpc.AgentdServicer):
    def __init__(self, sup: Supervisor, info: Callable[[], agentd_pb2.InfoResponse]) -> None:
        self.sup = sup
        self._info = info

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
    workers: int = 64,
) -> grpc.Server:
    """Bind the control socket and start serving. The caller waits on the server."""
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
    agentd_pb2_grpc.add_AgentdServicer_to_server(Servicer(sup, info), server)
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
    return server
