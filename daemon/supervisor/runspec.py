"""What a run asks for, checked and completed with the daemon's defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from agentd.v1 import agentd_pb2

from daemon.cgroups.layout import Layout
from daemon.cgroups.limits import Limits
from daemon.config import Config
from daemon.errors import FailedPrecondition, InvalidArgument, SandboxEscalation
from daemon.sandbox import bwrap, pin, policy
from daemon.sandbox.bwrap import Hidden
from daemon.sandbox.pin import Entrypoint
from daemon.sandbox.policy import Policies, Profile
from daemon.users import AgentUser, resolve

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_ARGV_BYTES = 32768
MIN_MEMORY_BYTES = 4 * 1024 * 1024
MIN_LEASE_MS = 100


@dataclass(frozen=True)
class RunSpec:
    limits: Limits
    lease_ms: int  # 0: no lease
    max_runtime_ms: int  # 0: no limit
    # argv[0] resolved on the agent's PATH and hashed: the file the launch execs.
    entrypoint: Entrypoint
    # The sandbox: the chosen profile with the run's overrides applied.
    profile: Profile = field(default_factory=lambda: Profile(name=policy.DEFAULT))
    env: dict[str, str] = field(default_factory=dict)  # the run's --env NAME=VALUE
    looser: tuple[str, ...] = ()  # how it is looser than the default (admin-approved)
    user: AgentUser | None = None  # None: a dynamic user, allocated at launch


def check(action: agentd_pb2.RunAction, cfg: Config, layout: Layout, *, policies: Policies,
          hidden: list[Hidden], admin: bool, reason: str) -> RunSpec:
    """Validate a RunAction, apply its sandbox policy and the defaults.

    Raises InvalidArgument (bad field, unknown policy, a bind that would show
    the daemon's files), SandboxEscalation (looser than the default profile
    without an admin signer and a reason), EntrypointMismatch (the pin),
    PolicyError / FailedPrecondition. Changes nothing: it runs in the gate's
    precheck, before the command is admitted.
    """
    if not NAME_RE.match(action.name):
        raise InvalidArgument(
            f"agent name {action.name!r} is invalid: use 1-63 of a-z 0-9 _ . - "
            "starting with a letter or digit")
    if not action.argv or not action.argv[0]:
        raise InvalidArgument("no command given to run")
    if any("\0" in a for a in action.argv):
        raise InvalidArgument("command arguments must not contain NUL bytes")
    if sum(len(a) for a in action.argv) > MAX_ARGV_BYTES:
        raise InvalidArgument(f"command line longer than {MAX_ARGV_BYTES} bytes")
    r = action.resources
    if r.memory_bytes and r.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(f"memory limit {r.memory_bytes} bytes is below the 4 MiB floor")
    if r.cpu_millis and r.cpu_millis < 10:
        raise InvalidArgument("cpu limit below 0.01 CPU")
    lease_ms = _lease(action, cfg)
    default = policies.default()
    profile, env = policy.apply(policies.get(action.policy), action)
    for path in (*profile.bind_ro, *profile.bind_rw):
        problem = bwrap.check_bind(path, hidden)
        if problem:
            raise InvalidArgument(f"cannot bind {path} into the sandbox: {problem}")
    # Before the escalation check: a root agent is refused outright, by
    # anyone, unless the config allows it.
    user = None if profile.user == policy.DYNAMIC else resolve(
        profile.user, allow_root=cfg.allow_root_agents)
    looser = policy.looser(profile, default, cfg.code_roots)
    if looser and not (admin and reason.strip()):
        raise SandboxEscalation(
            f"run refused: its sandbox is looser than the default profile in: "
            f"{'; '.join(looser)}. That needs a signature by a key with role admin and a "
            "non-empty reason (--reason)")
    # Resolved on the PATH the agent gets (the run may set it with --env),
    # and the launch execs exactly this file: a PATH trick cannot change
    # what runs after the pin has judged it.
    agent_path = policy.agent_env(profile, {"PATH": cfg.agent_path}, env, {}).get(
        "PATH", os.defpath)
    entrypoint = pin.resolve(action.argv[0], agent_path)
    if entrypoint.missing:
        raise FailedPrecondition(f"cannot exec {action.argv[0]}: {entrypoint.error}")
    pin.check(entrypoint, profile.entrypoint_sha256)
    return RunSpec(limits=_limits(profile, default, layout), lease_ms=lease_ms,
                   max_runtime_ms=action.max_runtime_ms if action.HasField("max_runtime_ms")
                   else 0, profile=profile, env=env, looser=tuple(looser),
                   entrypoint=entrypoint, user=user)


def _limits(p: Profile, default: Profile, layout: Layout) -> Limits:
    """The profile's limits, for apply_limits.

    A limit the run or a profile asked for must be enforced or the run
    refused (apply_limits raises). The default profile's own limits are
    applied only where a hierarchy holds their controller; the daemon warns
    at start about those it cannot enforce.
    """
    def pick(value: int, theirs: int, controller: str) -> int:
        return value if value != theirs or layout.holder(controller) else 0

    return Limits(memory_bytes=pick(p.memory_bytes, default.memory_bytes, "memory"),
                  pids_max=pick(p.pids_max, default.pids_max, "pids"),
                  cpu_millis=pick(p.cpu_millis, default.cpu_millis, "cpu"))


def _lease(action: agentd_pb2.RunAction, cfg: Config) -> int:
    lease = action.lease_ms if action.HasField("lease_ms") else int(cfg.default_lease_s * 1000)
    if lease == 0 and cfg.require_lease:
        raise FailedPrecondition(
            "this daemon requires every agent to run under a lease (require_lease); "
            "pass --lease, and keep it alive with 'agentctl keepalive'")
    if lease and lease < MIN_LEASE_MS:
        raise InvalidArgument(f"lease {lease} ms is below the {MIN_LEASE_MS} ms floor")
    if lease > cfg.max_lease_s * 1000:
        raise InvalidArgument(
            f"lease {lease / 1000:g}s exceeds the daemon's maximum of {cfg.max_lease_s:g}s")
    return lease


def check_ttl(ttl_ms: int, cfg: Config) -> None:
    """Validate a renew's ttl. Raises InvalidArgument."""
    if ttl_ms < MIN_LEASE_MS:
        raise InvalidArgument(f"renew ttl {ttl_ms} ms is below the {MIN_LEASE_MS} ms floor")
    if ttl_ms > cfg.max_lease_s * 1000:
        raise InvalidArgument(
            f"renew ttl {ttl_ms / 1000:g}s exceeds the daemon's maximum of {cfg.max_lease_s:g}s")
