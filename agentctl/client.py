"""The gRPC client for agentd's control socket: channel, deadlines, error translation.

Every call goes through :meth:`Client._call`, which turns a failed RPC into
an :class:`~agentctl.errors.AgentctlError`; nothing above this module sees a
``grpc.RpcError`` or an ``OSError`` from the socket.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
from agentd.v1 import agentd_pb2, agentd_pb2_grpc

from agentctl.errors import from_rpc_error, unreachable

CONNECT_TIMEOUT_S = 5.0
"""How long to wait for the socket to accept a connection."""
READ_DEADLINE_S = 10.0
"""Deadline of the read-only calls (Info, ListAgents, GetAgent)."""
RUN_DEADLINE_S = 30.0
LOGS_DEADLINE_S = 30.0
"""Deadline of a log tail without --follow (a large --tail takes a while to send)."""
KILL_DEADLINE_S = 30.0
"""Deadline of a kill; a stop gets its grace period on top."""
DAEMON_DEFAULT_GRACE_S = 5.0
"""The grace period the daemon applies to a stop that names none."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def stop_deadline(grace_s: float | None) -> float:
    """Deadline of a stop: the grace period, then the kill's own deadline."""
    return (DAEMON_DEFAULT_GRACE_S if grace_s is None else grace_s) + KILL_DEADLINE_S


class Client:
    """A connection to agentd over its Unix socket. Use :func:`connect`.

    Methods raise AgentctlError subclasses (see agentctl.errors), never
    grpc.RpcError.
    """

    def __init__(self, socket_path: Path, *, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Open a channel to *socket_path*; no connection is made until a call."""
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self._channel = grpc.insecure_channel(
            f"unix:{socket_path.absolute()}",
            # A Unix socket needs no proxy; an https_proxy in the operator's
            # environment must not reroute the kill switch.
            options=[("grpc.enable_http_proxy", 0),
                     # A listing of a thousand agents is a few MB (gRPC's default: 4).
                     ("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        self.stub = agentd_pb2_grpc.AgentdStub(self._channel)
        self._probed = False

    # ------------------------------------------------------------- read-only
    def info(self) -> agentd_pb2.InfoResponse:
        """The daemon's Info: host id (the audience), limits, audit head."""
        return self._call(self.stub.Info, agentd_pb2.InfoRequest(), READ_DEADLINE_S)

    def list_agents(self) -> list[agentd_pb2.Agent]:
        """Every agent the daemon knows, running or ended."""
        resp = self._call(self.stub.ListAgents, agentd_pb2.ListAgentsRequest(), READ_DEADLINE_S)
        return list(resp.agents)

    def get_agent(self, name: str) -> agentd_pb2.Agent:
        """One agent by name. Raises NotFound."""
        request = agentd_pb2.GetAgentRequest(name=name)
        return self._call(self.stub.GetAgent, request, READ_DEADLINE_S)

    def events(
        self, *, follow: bool, backlog: int, agent: str = ""
    ) -> Generator[agentd_pb2.Event, None, None]:
        """The daemon's recent events (up to *backlog*), then with *follow* new ones.

        Following has no deadline: the stream lasts while the caller reads.
        Closing the iterator (or an exception in the caller) cancels the call.
        Raises AgentctlError; RESOURCE_EXHAUSTED when the daemon already
        serves its maximum of event streams.
        """
        self._probe()
        deadline = None if follow else READ_DEADLINE_S
        request = agentd_pb2.EventsRequest(follow=follow, backlog=backlog, agent=agent)
        call = self.stub.Events(request, timeout=deadline, wait_for_ready=True)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket_path, deadline_s=deadline or 0.0) from err
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    def logs(
        self, name: str, *, follow: bool, tail_bytes: int = 0
    ) -> Generator[agentd_pb2.LogChunk, None, None]:
        """Agent *name*'s captured output: the tail (*tail_bytes*, 0 for the daemon's
        default of 64 KiB) of stdout, then of stderr; with *follow*, new output
        as it comes, until the agent has ended.

        Following has no deadline. Closing the iterator cancels the call.
        Raises AgentctlError (NotFound for an unknown agent).
        """
        self._probe()
        deadline = None if follow else LOGS_DEADLINE_S
        request = agentd_pb2.LogsRequest(name=name, follow=follow, tail_bytes=tail_bytes)
        call = self.stub.Logs(request, timeout=deadline, wait_for_ready=True)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket_path, deadline_s=deadline or 0.0) from err
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    # ---------------------------------------------------------------- signed
    def run(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.Agent:
        """Send a signed run command; returns the launched agent."""
        return self._call(self.stub.Run, envelope, RUN_DEADLINE_S, signed=True)

    def stop(self, envelope: agentd_pb2.Envelope, grace_s: float | None) -> agentd_pb2.KillResult:
        """Send a signed stop; waits out the grace period plus the kill."""
        return self._call(self.stub.Stop, envelope, stop_deadline(grace_s), signed=True)

    def kill(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.KillResult:
        """Send a signed kill; returns once the daemon verified the cgroup empty (or gave up)."""
        return self._call(self.stub.Kill, envelope, KILL_DEADLINE_S, signed=True)

    def freeze(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.Agent:
        """Send a signed freeze; returns once the kernel reports the agent frozen."""
        return self._call(self.stub.Freeze, envelope, RUN_DEADLINE_S, signed=True)

    def cut(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.Agent:
        """Send a signed cut: every flow of an allowlist agent closed, its allowlist emptied."""
        return self._call(self.stub.Cut, envelope, RUN_DEADLINE_S, signed=True)

    def thaw(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.Agent:
        """Send a signed thaw."""
        return self._call(self.stub.Thaw, envelope, RUN_DEADLINE_S, signed=True)

    def renew(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.LeaseResult:
        """Send a signed lease renewal."""
        return self._call(self.stub.Renew, envelope, RUN_DEADLINE_S, signed=True)

    def estop(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.EstopResult:
        """Send a signed emergency stop; returns once every cgroup was verified (or not)."""
        return self._call(self.stub.Estop, envelope, KILL_DEADLINE_S, signed=True)

    def reset(self, envelope: agentd_pb2.Envelope) -> agentd_pb2.ResetResult:
        """Send a signed reset of the emergency-stop latch."""
        return self._call(self.stub.Reset, envelope, RUN_DEADLINE_S, signed=True)

    # -------------------------------------------------------------- plumbing
    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        deadline_s: float,
        *,
        signed: bool = False,
    ) -> Resp:
        self._probe()
        try:
            # wait_for_ready: ride out a reconnect within the deadline rather
            # than fail on the first transient error; the probe has already
            # caught a daemon that is not there at all.
            return method(request, timeout=deadline_s, wait_for_ready=True)
        except grpc.RpcError as err:
            raise from_rpc_error(
                err, self.socket_path, deadline_s=deadline_s, signed=signed
            ) from err

    def _probe(self) -> None:
        """Connect to the socket once by hand, to say precisely why it fails.

        gRPC would retry a missing or refusing socket until the deadline and
        then report a generic UNAVAILABLE; the kernel's errno is clearer.
        """
        if self._probed:
            return
        why = _connect_error(self.socket_path, self.connect_timeout)
        if why is not None:
            raise unreachable(self.socket_path, why)
        self._probed = True

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(socket_path: Path, *, connect_timeout: float = CONNECT_TIMEOUT_S) -> Client:
    """Return a client for the daemon at *socket_path* (connects on first call)."""
    return Client(socket_path, connect_timeout=connect_timeout)


def _connect_error(path: Path, timeout: float) -> str | None:
    """Try to connect to the Unix socket at *path*; None if it accepts, else why not."""
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return "not a socket"
    except FileNotFoundError:
        return "no such socket"
    except PermissionError:
        return "permission denied"
    except OSError as err:
        return os.strerror(err.errno) if err.errno else str(err)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            return "no such socket"
        except PermissionError:
            return "permission denied"
        except ConnectionRefusedError:
            return "connection refused"
        except TimeoutError:
            # The listen backlog is full: the daemon is alive but swamped.
            return f"not accepting connections within {timeout:g} s"
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                return "socket path too long (use a shorter --socket path)"
            return os.strerror(err.errno) if err.errno else str(err)
    return None
