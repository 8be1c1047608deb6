"""One agent's record: what the daemon launched and what the kernel says of it."""

from __future__ import annotations

import enum
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.cgroups.limits import Limits
from daemon.cgroups.tree import AgentCgroup
from daemon.monitor.model import Signals
from daemon.sandbox.verify import Report
from daemon.supervisor.egress import AgentEgress
from daemon.users import AgentUser


class State(enum.StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"  # its main process ended by itself
    KILLED = "killed"  # ended by a stop or a kill
    FROZEN = "frozen"  # every process stopped by the cgroup freezer


ENDED = frozenset({State.EXITED, State.KILLED})


@dataclass(eq=False)
class Agent:
    """A launched agent. Fields after `proc` change over its life.

    State changes go through `lock`, held for the assignment only: the kill
    path never waits on it for anything slow.
    """

    name: str
    id: str
    argv: list[str]
    user: AgentUser
    limits: Limits
    cgroup: AgentCgroup
    started_by: str
    stdout_log: Path
    stderr_log: Path
    proc: subprocess.Popen[bytes]
    main_pid: int
    started_at: float  # wall clock, from /proc/PID/stat
    state: State = State.RUNNING
    kill_requested: bool = False
    exit_code: int | None = None
    exit_signal: int | None = None
    ended_at: float | None = None
    oom_kills: int = 0
    lease_ttl_ms: int = 0
    max_runtime_ms: int = 0
    # Why it ended (or is ending): exited, killed, stopped, lease_expired,
    # max_runtime, estop, daemon_shutdown. The first reason given wins.
    end_reason: str = ""
    # The newest sample of kernel-observed signals (daemon.monitor).
    signals: Signals = field(default_factory=Signals)
    # The sandbox as asked for and as checked from outside after launch.
    sandbox: Report | None = None
    # bwrap's own processes (its outer one, the main pid, and its init): a
    # stop's SIGTERM skips them (the outer one would die of it and take the
    # agent's grace period along). They count as the agent's processes.
    helper_pids: frozenset[int] = frozenset()
    # network "allowlist": its namespace, allowlist and what the proxy saw.
    egress: AgentEgress | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def is_ended(self) -> bool:
        return self.state in ENDED

    def request_end(self, reason: str) -> None:
        """Record that the daemon is ending this agent, and why (first reason wins)."""
        with self.lock:
            self.kill_requested = True
            if not self.end_reason:
                self.end_reason = reason

    def set_state(self, new: State) -> None:
        with self.lock:
            # An ended agent stays ended; KILLED wins over EXITED only while
            # a kill was requested before the end was recorded.
            if self.state in ENDED:
                return
            self.state = new

    def record_exit(self, returncode: int) -> None:
        with self.lock:
            if returncode < 0:
                self.exit_signal = -returncode
            else:
                self.exit_code = returncode

    def mark_ended(self) -> None:
        with self.lock:
            if self.state not in ENDED:
                self.state = State.KILLED if self.kill_requested else State.EXITED
            if not self.end_reason:
                self.end_reason = "exited"
            if self.ended_at is None:
                self.ended_at = time.time()
        self.ended.set()
