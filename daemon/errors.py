"""Domain errors. Each knows its gRPC status; the API maps them in one place.

Messages are written for an on-call engineer: say what was refused and what
to do about it. Nothing above the edge catches a bare OSError: the edge
translates it into one of these.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import ClassVar

import grpc


class AgentdError(Exception):
    """Base of every error the daemon reports to a client."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    # Short machine-readable reason, recorded in the audit log.
    reason: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # A refused signed command: done once its audit record is written
        # (daemon.commands.gate); None when it was counted into a summary.
        self.audit_written: Future[None] | None = None


# ------------------------------------------------------------- bad requests
class InvalidArgument(AgentdError):
    """The request is malformed: size, structure, a field out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class EnvelopeTooLarge(InvalidArgument):
    reason = "envelope_too_large"


class MalformedCommand(InvalidArgument):
    reason = "malformed_command"


# ----------------------------------------------------------- authentication
class AuthError(AgentdError):
    """The command is not an authentic, fresh command for this daemon.

    The one error type verify() raises; subclasses say why.
    """

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class Unsigned(AuthError):
    reason = "unsigned"


class BadSignature(AuthError):
    reason = "bad_signature"


class Expired(AuthError):
    reason = "expired"


class NotYetValid(AuthError):
    reason = "not_yet_valid"


class WrongAudience(AuthError):
    reason = "wrong_audience"


class Replayed(AuthError):
    reason = "replayed"


class PermissionDenied(AuthError):
    """Authentic, but the signer's roles do not allow the action."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


# ------------------------------------------------------------ daemon state
class FailedPrecondition(AgentdError):
    """Valid command, but the daemon's state refuses it now."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "failed_precondition"


class ReplayCacheDegraded(FailedPrecondition):
    reason = "replay_cache_degraded"


class ReplayCacheIOError(FailedPrecondition):
    """The replay cache file cannot be read or written.

    A run is refused until its entry is on disk: otherwise a restart would
    forget it and the command could be replayed.
    """

    reason = "replay_cache_io"


class TrustStoreError(FailedPrecondition):
    """The trust store cannot be loaded; every signed command is refused."""

    reason = "trust_store_invalid"


class EstopDuringLaunch(FailedPrecondition):
    """An emergency stop latched while the agent was starting; the agent was killed."""

    reason = "estop_during_launch"

    def __init__(self, message: str, agent_id: str) -> None:
        super().__init__(message)
        self.agent_id = agent_id


class WrongRun(FailedPrecondition):
    """The command names a run (an agent id) that no longer holds the agent's name.

    FAILED_PRECONDITION, not NOT_FOUND: the agent exists; what the signer
    stated (this run is the one) is not the daemon's state. Re-signing for
    the current run is the fix, not looking for another agent.
    """

    reason = "wrong_run"


class ControllerUnavailable(FailedPrecondition):
    reason = "controller_unavailable"


class LaunchFailed(FailedPrecondition):
    reason = "launch_failed"


class SandboxNotApplied(LaunchFailed):
    """A restriction the profile asked for was not found in place after launch; agent killed."""

    reason = "sandbox_not_applied"


class PolicyError(FailedPrecondition):
    """A sandbox policy file is unusable; every run is refused until it is fixed."""

    reason = "policy_invalid"


class EntrypointMismatch(FailedPrecondition):
    """argv[0] does not hash to the pinned sha256."""

    reason = "entrypoint_mismatch"


class SandboxEscalation(PermissionDenied):
    """The run's sandbox is looser than the default and lacks an admin signature or a reason."""

    reason = "sandbox_escalation"


class Overloaded(AgentdError):
    """More signed commands wait for verification on this socket than it queues."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "overloaded"


class AgentNotFound(AgentdError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "agent_not_found"


class AgentExists(AgentdError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "agent_exists"


# ------------------------------------------------------------- the kernel
class CgroupError(AgentdError):
    """A cgroupfs read or write failed. Carries the path and what was written."""

    reason = "cgroup_error"

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class GuardianError(AgentdError):
    """The guardian could not be started or did not arm."""

    reason = "guardian_failed"


class AuditWriteError(AgentdError):
    """An audit record could not be written or made durable. The message says which."""

    reason = "audit_write_failed"


class AuditUnavailable(FailedPrecondition):
    """The audit log cannot be written now: a command that starts or loosens is refused.

    Stops, kills, estops and freezes still act; their records wait in memory
    and are written, in order, once the disk takes them again.
    """

    reason = "audit_unavailable"


class ConfigError(Exception):
    """The daemon's configuration is unusable. Raised at start-up only."""
