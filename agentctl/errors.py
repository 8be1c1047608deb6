"""agentctl's errors: each carries its exit code, and gRPC statuses map here only.

Every error reaches the operator as one line on stderr,
``agentctl: error: MESSAGE``, and the process exits with the error's code.
Exit codes (click's own: 0 success, 2 usage error):

==  =====================================================================
1   any other failure
2   usage: a bad option or argument
3   UNAUTHENTICATED: bad signature, expired, wrong audience, replayed
4   PERMISSION_DENIED: the signer's roles do not allow the action
5   NOT_FOUND: no such agent
6   FAILED_PRECONDITION or ALREADY_EXISTS: the daemon's state refuses it
7   the daemon is unreachable: no socket, no access, not answering
8   the kill finished but processes are stuck (the daemon keeps watching)
9   INVALID_ARGUMENT: the daemon found the request malformed
10  the audit log failed verification
11  keepalive: a lease renewal was refused or could not be delivered in time
130 interrupted (Ctrl-C)
==  =====================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import click
import grpc


class AgentctlError(click.ClickException):
    """Base of agentctl's errors: a one-line message and an exit code."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        # The gRPC status name when the daemon refused, for --json output.
        self.status = status
        # Set once the command has already printed its --json result, so the
        # error is not printed as a second JSON document.
        self.result_printed = False


class Unauthenticated(AgentctlError):
    exit_code = 3


class PermissionDenied(AgentctlError):
    exit_code = 4


class NotFound(AgentctlError):
    exit_code = 5


class Refused(AgentctlError):
    """The daemon's state refuses the command now (precondition, name taken)."""

    exit_code = 6


class DaemonUnreachable(AgentctlError):
    exit_code = 7


class KillIncomplete(AgentctlError):
    """The kill ran but processes are still present (e.g. in D state)."""

    exit_code = 8


class InvalidArgument(AgentctlError):
    exit_code = 9


class AuditBroken(AgentctlError):
    exit_code = 10


class LeaseLost(AgentctlError):
    """keepalive: a renewal was refused, or not delivered before the lease ran out."""

    exit_code = 11


class Interrupted(AgentctlError):
    exit_code = 130


_BY_STATUS: dict[grpc.StatusCode, type[AgentctlError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: Refused,
    grpc.StatusCode.ALREADY_EXISTS: Refused,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
}

# What grpc's connection errors say, and what the operator should read.
_CONNECT_ERRORS = (
    ("No such file or directory", "no such socket"),
    ("Connection refused", "connection refused"),
    ("Permission denied", "permission denied"),
)

UNREACHABLE_HINT = "(is the daemon running? set --socket or AGENTD_SOCKET)"


def unreachable(socket_path: Path, why: str) -> DaemonUnreachable:
    """The error for a daemon that cannot be reached at *socket_path*, and *why*."""
    hint = UNREACHABLE_HINT
    if why == "permission denied":
        hint = "(the control socket is for root and its group: use sudo or join the group)"
    return DaemonUnreachable(
        f"cannot reach agentd at {socket_path}: {why} {hint}", status="UNAVAILABLE"
    )


def from_rpc_error(
    err: grpc.RpcError, socket_path: Path, *, deadline_s: float, signed: bool = False
) -> AgentctlError:
    """Translate a failed call into the CLI error the operator should see.

    The daemon's status message is shown verbatim after the status name:
    it was written for the operator. *deadline_s* is the call's deadline, to
    say how long agentctl waited; *signed* says the call may have changed
    something (so a timeout does not mean nothing happened).
    """
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    details = " ".join(details.split())  # one line, whatever the daemon sent
    if code is grpc.StatusCode.UNAVAILABLE:
        why = next((short for text, short in _CONNECT_ERRORS if text in details), details)
        return unreachable(socket_path, why)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"DEADLINE_EXCEEDED: agentd did not answer within {deadline_s:g} s"
        if signed:
            message += "; the command may still be carried out (check: agentctl status NAME)"
        return AgentctlError(message, status=code.name)
    cls = _BY_STATUS.get(code, AgentctlError)
    return cls(f"{code.name}: {details}", status=code.name)
