"""Daemon configuration: a TOML file for deployment, or --dev DIR for a local daemon."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from daemon import strictmodes
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
    # The emergency socket: stop, kill, estop and freeze only, for a group of
    # its own (on-call humans), so that nothing reaching the control socket
    # (a flood of connections, calls that never finish) can stand between
    # them and a kill. Its own directory is its gate, as for the control socket.
    stop_socket_path: Path = Path("/run/agentd-stop/stop.sock")
    stop_socket_group: str = "agentd-stop"
    # Connections the control socket accepts at once (at most a tenth of the
    # daemon's open-files limit: agents' descriptors always come first).
    max_connections: int = 2048

    # Signed commands.
    max_command_lifetime_s: float = 300.0
    clock_skew_s: float = 60.0
    max_envelope_bytes: int = 65536
    max_signatures: int = 8

    # Agents.
    # "dynamic": a fresh uid per agent from dynamic_uid_min..max (like
    # systemd's DynamicUser=); or the name of an unprivileged user.
    default_user: str = "dynamic"
    dynamic_uid_min: int = 61184
    dynamic_uid_max: int = 65519
    # Sandbox profiles, one NAME.toml each (docs/sandbox.md); default.toml
    # replaces the built-in default profile.
    policy_dir: Path = Path("/etc/agentd/policies")
    # Host directories holding agents' code: a run may bind one, or anything
    # below one, read-only without an admin's signature (docs/sandbox.md).
    # Everything else of the host is outside the default view, and a bind
    # of it is an escalation.
    code_roots: tuple[str, ...] = ()
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

    # Monitoring: kernel-observed signals (daemon.monitor.sampler).
    # How often every running agent is sampled, in seconds; 0: never.
    sample_interval_s: float = 1.0
    # Comma-separated absolute paths under which agents may write without
    # it being reported as a file written outside scratch.
    allowed_write_prefixes: str = "/scratch,/tmp,/var/tmp,/dev"

    # Output tripwires (docs/tripwires.md). A TOML file of [[rule]] tables;
    # "": the built-in starting list.
    rules_file: str = ""
    # Detector (docs/detectors.md): a command run as detector_user, fed agent
    # output as JSON lines; "": none. It can never order more than
    # detector_max_action (alert | freeze | kill).
    detector_command: str = ""
    detector_user: str = "nobody"
    detector_max_action: str = "freeze"

    # cgroups.
    cgroup_mode: str = "auto"  # auto | v2 | hybrid
    cgroup_name: str = "agentd"
    # Testing only: behave as on a kernel without cgroup.kill.
    force_kill_fallback: bool = False
    # Testing only (dev mode): leave one sandbox restriction out (seccomp,
    # network, pid, view: the whole host shown read-only, or masks: /etc's
    # secrets and the daemon's files) so the checks from outside can be seen
    # to catch it.
    sandbox_test_omit: str = ""

    # Egress allowlists (docs/egress.md). Upstream DNS servers, "IP:PORT"
    # ("[IPv6]:PORT"); empty: the host's /etc/resolv.conf nameservers.
    egress_resolvers: tuple[str, ...] = ()
    # CIDRs an allowlisted name may resolve into although they are private,
    # loopback, link-local or metadata ranges (sites whose allowed services
    # are internal; tests on loopback).
    egress_private_ranges_ok: tuple[str, ...] = ()

    # Prometheus metrics: "" (off), "HOST:PORT" or "unix:/ABSOLUTE/PATH".
    metrics_listen: str = ""
    # Allow a HOST that is not a loopback address (the metrics are unauthenticated).
    metrics_allow_remote: bool = False

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
_PATH_FIELDS = {"socket_path", "stop_socket_path", "state_dir", "trust_store", "audit_log",
                "policy_dir"}


def load(path: Path, *, dev: bool = False) -> Config:
    """Read a TOML config file. Raises ConfigError naming the problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path} is not valid TOML: {err}") from err
    return from_mapping(data, source=str(path), dev=dev)


def from_mapping(data: dict[str, Any], *, source: str, dev: bool = False) -> Config:
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
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {key} must be a list of strings")
            values[key] = tuple(dict.fromkeys(value))
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{source}: {key} must be a non-negative integer")
            values[key] = value
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a string")
            values[key] = value
    cfg = replace(defaults, dev=dev, **values)
    check(cfg, source)
    return cfg


def dev(directory: Path, *, user: str | None = None, **overrides: Any) -> Config:
    """The zero-setup local daemon: everything under directory.

    Settings may come from DIR/agentd.toml if it exists (same format as the
    deployment config); the paths and the cgroup subtree are always the dev
    directory's.
    """
    d = directory.resolve()
    # Before anything in it is read: root must not trust what others can plant.
    strictmodes.check(d)
    base = load(d / "agentd.toml", dev=True) if (d / "agentd.toml").exists() else Config()
    # Its own cgroup subtree, named after its directory: a dev daemon sweeps
    # leftover cgroups at start, and must never sweep a deployed daemon's
    # ("agentd") or another dev daemon's.
    tag = hashlib.sha256(str(d).encode()).hexdigest()[:8]
    cfg = replace(
        base,
        cgroup_name=f"agentd-dev-{tag}",
        socket_path=d / "agentd.sock",
        stop_socket_path=d / "stop" / "stop.sock",
        state_dir=d / "state",
        trust_store=d / "trusted_keys",
        audit_log=d / "audit.log",
        policy_dir=d / "policies",
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
    for root in cfg.code_roots:
        if not root.startswith("/") or os.path.normpath(root) != root or root.startswith("//"):
            raise ConfigError(f"{source}: code_roots: {root!r} must be an absolute, normalised "
                              "path")
        if root == "/":
            raise ConfigError(f"{source}: code_roots: / would let any run bind the whole host")
    if cfg.rules_file and not cfg.rules_file.startswith("/"):
        raise ConfigError(f"{source}: rules_file must be an absolute path")
    if cfg.detector_max_action not in ("alert", "freeze", "kill"):
        raise ConfigError(f"{source}: detector_max_action must be alert, freeze or kill")
    if cfg.detector_user in ("root", "0"):
        raise ConfigError(f"{source}: detector_user must not be root: a detector is trusted "
                          "less than the daemon")
    if any(not p.strip().startswith("/") for p in cfg.allowed_write_prefixes.split(",")
           if p.strip()):
        raise ConfigError(f"{source}: allowed_write_prefixes must list absolute paths")
    metrics_address(cfg.metrics_listen, allow_remote=cfg.metrics_allow_remote, source=source)
    for resolver in cfg.egress_resolvers:
        resolver_address(resolver, source=source)
    for cidr in cfg.egress_private_ranges_ok:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{source}: egress_private_ranges_ok: {cidr!r} is not a CIDR "
                              "(10.0.0.0/8, fd00::/8)") from None
    if cfg.sandbox_test_omit and not cfg.dev:
        raise ConfigError(f"{source}: sandbox_test_omit is for tests of a dev daemon only")
    if cfg.sandbox_test_omit not in ("", "seccomp", "network", "pid", "view", "masks"):
        raise ConfigError(f"{source}: sandbox_test_omit must be seccomp, network, pid, view "
                          "or masks")
    if not 0 < cfg.dynamic_uid_min <= cfg.dynamic_uid_max < 2**31 - 1:
        raise ConfigError(f"{source}: dynamic_uid_min..dynamic_uid_max must be a non-empty "
                          "range of non-root uids")
    if cfg.default_user == "root" and not cfg.allow_root_agents:
        raise ConfigError(
            f"{source}: default_user is root but allow_root_agents is false; "
            "agents never run as root unless the config says so"
        )


def metrics_address(
    value: str, *, allow_remote: bool, source: str
) -> tuple[str, int] | Path | None:
    """Where metrics are served: None (off), (host, port), or a Unix socket path.

    The metrics endpoint has no authentication, so a TCP host must be a
    loopback address unless allow_remote says otherwise. Raises ConfigError.
    """
    if not value:
        return None
    if value.startswith("unix:"):
        path = Path(value.removeprefix("unix:"))
        if not path.is_absolute():
            raise ConfigError(f"{source}: metrics_listen {value!r}: the socket path must be "
                              "absolute (unix:/run/agentd/metrics.sock)")
        return path
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{source}: metrics_listen {value!r} is not HOST:PORT "
                          "(127.0.0.1:9464) or unix:/PATH")
    if not allow_remote:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(
                f"{source}: metrics_listen {value!r} is not a loopback address; the metrics "
                "endpoint has no authentication. Use 127.0.0.1 or ::1, or set "
                "metrics_allow_remote = true if the network is trusted")
    return host, int(port_text)


def resolver_address(value: str, *, source: str) -> tuple[str, int]:
    """An upstream DNS server from "IP:PORT" or "[IPv6]:PORT". Raises ConfigError."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port_text.isdigit() and 0 < int(port_text) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{source}: egress_resolvers: {value!r} is not IP:PORT "
                          "(9.9.9.9:53, [2620:fe::fe]:53)")
    return host, int(port_text)
