"""What the daemon observes of an agent, from cgroupfs and /proc. Never from the agent."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Signals:
    """One sample of an agent's kernel-observed signals (mirrors agentd.v1.AgentSignals)."""

    sampled_at: float = 0.0  # wall clock
    uptime_s: float = 0.0
    # New pids seen in the cgroup since launch, bwrap's own processes excepted.
    processes_started: int = 0
    # processes_started's growth per second over the last second (daemon.monitor.rates).
    processes_per_second: float = 0.0
    # The same over each window a tripwire rule asks for: seconds -> per second.
    process_rates: dict[float, float] = field(default_factory=dict)
    recent_commands: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0
    cpu_percent: float = 0.0  # over the last window; 100 = one CPU
    memory_bytes: int = 0
    pids: int = 0
    sockets_open: int = 0
    connections: int = 0  # TCP/UDP sockets connecting or connected, not listening
    remote_addresses: list[str] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)  # open for writing, outside allowed
    oom_kills: int = 0
    tripwire_hits: int = 0
    # network "allowlist": counted by agentd's egress proxy.
    egress_denied: int = 0  # connections and lookups denied since launch
    egress_bytes: int = 0  # through the proxy, both ways
    egress_flows_open: int = 0
    # Commands (argv[0] paths) executed since the last sample, for exec rules.
    new_executables: list[str] = field(default_factory=list)
