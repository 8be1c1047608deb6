"""Daemon configuration: a TOML file for deployment, or --dev DIR for a local daemon."""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """Everything the daemon reads at start-up. Paths are absolute."""

    socket_path: Path = Path("/run/agentd/agentd.sock")
    state_dir: Path = Path("/var/lib/agentd")
    trust_store: Path = Path("/etc/agentd/trusted_keys")
    audit_log: Path = Path("/var/log/agentd/audit.log")
    # Empty: generated once and kept in state_dir/host_id.
    host_id: str = ""
    socket_group: str = "agentd"

    # Signed commands.
    max_command_lifetime_s: float = 300.0
    clock_skew_s: float = 60.0
    max_envelope_bytes: int = 65536
    max_signatures: int = 8

    # Agents.
    default_user: str = "nobody"
    allow_root_agents: bool = False
    default_pids_max: int = 1024
    default_memory_bytes: int = 0
    log_cap_bytes: int = 16 * 1024 * 1024
    # Open files an agent may hold (soft and hard: it cannot raise it).
    agent_nofile: int = 1024
    agent_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    # Stop and kill.
    default_grace_s: float = 5.0
    max_grace_s: float = 300.0
    # How long to wait for the kernel to report a killed cgroup empty before
    # reporting the remaining processes as stuck (for example in D state).
    kill_verify_timeout_s: float = 5.0

    # Leases (dead-man's switch) and run-time limits.
    default_lease_s: float = 0.0  # 0: runs without --lease get no lease
    require_lease: bool = False  # refuse runs without a lease
    max_lease_s: float = 86400.0
    # Emergency stop: distinct principals whose signatures a reset needs.
    reset_signatures: int = 1

    # Watchdogs. The guardian kills every agent if the enforcement loop's
    # heartbeats stop for this long, or the daemon dies. 0 turns it off.
    guardian_timeout_s: float = 5.0

    # cgroups.
    cgroup_mode: str = "auto"  # auto | v2 | hybrid
    cgroup_name: str = "agentd"
    # Testing only: behave as on a kernel without cgroup.kill.
    force_kill_fallback: bool = False

    dev: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def replay_path(self) -> Path:
        return self.state_dir / "replay.jsonl"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def latch_path(self) -> Path:
        return self.state_dir / "estop.latch"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PATH_FIELDS = {"socket_path", "state_dir", "trust_store", "audit_log"}


def load(path: Path) -> Config:
    """Read a TOML config file. Raises ConfigError naming the problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path} is not valid TOML: {err}") from err
    return from_mapping(data, source=str(path))


def from_mapping(data: dict[str, Any], *, source: str) -> Config:
    """Build a Config from parsed TOML, checking names and types. Raises ConfigError."""
    known = {f.name: f for f in fields(Config) if f.name not in ("dev", "extra")}
    values: dict[str, Any] = {}
    defaults = Config()
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        default = getattr(defaults, key)
        if key in _PATH_FIELDS:
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(f"{source}: {key} must be an absolute path")
            values[key] = Path(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be true or false")
            values[key] = value
        elif isinstance(default, float):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{source}: {key} must be a non-negative number")
            values[key] = float(value)
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{source}: {key} must be a non-negative integer")
            values[key] = value
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a string")
            values[key] = value
    cfg = replace(defaults, **values)
    check(cfg, source)
    return cfg


def dev(directory: Path, *, user: str | None = None, **overrides: Any) -> Config:
    """The zero-setup local daemon: everything under directory.

    Settings may come from DIR/agentd.toml if it exists (same format as the
    deployment config); the paths and the cgroup subtree are always the dev
    directory's.
    """
    d = directory.resolve()
    base = load(d / "agentd.toml") if (d / "agentd.toml").exists() else Config()
    # Its own cgroup subtree, named after its directory: a dev daemon sweeps
    # leftover cgroups at start, and must never sweep a deployed daemon's
    # ("agentd") or another dev daemon's.
    tag = hashlib.sha256(str(d).encode()).hexdigest()[:8]
    cfg = replace(
        base,
        cgroup_name=f"agentd-dev-{tag}",
        socket_path=d / "agentd.sock",
        state_dir=d / "state",
        trust_store=d / "trusted_keys",
        audit_log=d / "audit.log",
        default_user=user or base.default_user,
        dev=True,
    )
    cfg = replace(cfg, **overrides)
    check(cfg, str(directory))
    return cfg


def check(cfg: Config, source: str) -> None:
    """Cross-field checks. Raises ConfigError."""
    if cfg.cgroup_mode not in ("auto", "v2", "hybrid"):
        raise ConfigError(f"{source}: cgroup_mode must be auto, v2 or hybrid")
    if not _NAME_RE.match(cfg.cgroup_name):
        raise ConfigError(f"{source}: cgroup_name {cfg.cgroup_name!r} is not a valid name")
    if cfg.max_command_lifetime_s <= 0:
        raise ConfigError(f"{source}: max_command_lifetime_s must be positive")
    if cfg.reset_signatures < 1:
        raise ConfigError(f"{source}: reset_signatures must be at least 1")
    if cfg.default_lease_s > cfg.max_lease_s:
        raise ConfigError(f"{source}: default_lease_s exceeds max_lease_s")
    if cfg.default_user == "root" and not cfg.allow_root_agents:
        raise ConfigError(
            f"{source}: default_user is root but allow_root_agents is false; "
            "agents never run as root unless the config says so"
        )
