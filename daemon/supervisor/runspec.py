"""What a run asks for, checked and completed with the daemon's defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.cgroups.layout import Layout
from daemon.cgroups.tree import Limits
from daemon.config import Config
from daemon.errors import FailedPrecondition, InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_ARGV_BYTES = 32768
MIN_MEMORY_BYTES = 4 * 1024 * 1024
MIN_LEASE_MS = 100


@dataclass(frozen=True)
class RunSpec:
    limits: Limits
    lease_ms: int  # 0: no lease
    max_runtime_ms: int  # 0: no limit


def check(action: agentd_pb2.RunAction, cfg: Config, layout: Layout) -> RunSpec:
    """Validate a RunAction and apply defaults. Raises InvalidArgument / FailedPrecondition."""
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
    return RunSpec(limits=_limits(r, cfg, layout), lease_ms=_lease(action, cfg),
                   max_runtime_ms=action.max_runtime_ms if action.HasField("max_runtime_ms")
                   else 0)


def _limits(r: agentd_pb2.Resources, cfg: Config, layout: Layout) -> Limits:
    """Requested limits, with the daemon's defaults where none was asked for.

    A limit the operator asked for must be enforced or the run refused
    (apply_limits raises). A default is applied only where a hierarchy holds
    its controller; the daemon warns at start about those it cannot enforce.
    """
    memory = r.memory_bytes or (cfg.default_memory_bytes if layout.holder("memory") else 0)
    pids = r.pids_max or (cfg.default_pids_max if layout.holder("pids") else 0)
    return Limits(memory_bytes=memory, pids_max=pids, cpu_millis=r.cpu_millis)


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
