"""Agent-like records around real cgroups and processes, to drive the Sampler without a daemon.

The sampler needs of an agent only its id, cgroup, start time, signals, lock
and whether it ended; these records carry exactly that, over a real
AgentCgroup under a test subtree (named with the harness's prefix, so the
session's leak check sees anything left behind). Processes run as the
caller (root), joined to the cgroup by a shell before the program starts.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

from daemon.cgroups import fs
from daemon.cgroups.layout import discover
from daemon.cgroups.tree import AgentCgroup, AgentTree
from daemon.monitor.model import Signals
from daemon.monitor.sampler import Sampler
from tests.harness import CGROUP_PREFIX

# Joins every cgroup listed in $1 (space-separated cgroup.procs paths), then
# runs the program: nothing of it runs outside the cgroup.
_JOIN = 'for f in $1; do echo $$ > "$f"; done; shift; exec "$@"'


@dataclass(eq=False)
class ScratchAgent:
    id: str
    name: str
    cgroup: AgentCgroup
    proc: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.time)
    signals: Signals = field(default_factory=Signals)
    lock: threading.Lock = field(default_factory=threading.Lock)
    kill_requested: bool = False
    is_ended: bool = False
    removed: bool = False  # killed, reaped and its cgroup removed
    helper_pids: frozenset[int] = frozenset()  # no sandbox here: no bwrap processes
    egress: None = None  # no allowlist: no egress counters


class ScratchAgents:
    """A test cgroup subtree, its agents, and running() for a Sampler."""

    def __init__(self, prefix: str = CGROUP_PREFIX) -> None:
        self.tree = AgentTree(discover(), prefix + "sampler-" + uuid.uuid4().hex[:8])
        # Not tree.prepare(): that may move this very process into a leaf.
        fs.mkdir(self.tree.base_v2)
        for path in self.tree.base_v1.values():
            fs.mkdir(path)
        self.tree.has_cgroup_kill = fs.exists(self.tree.base_v2 / "cgroup.kill")
        self.agents: list[ScratchAgent] = []

    def running(self) -> list[ScratchAgent]:
        return [a for a in self.agents if not a.is_ended]

    def sampler(self, interval_s: float = 0.0, allowed: str = "/tmp,/var/tmp,/dev") -> Sampler:
        return Sampler(self, interval_s, allowed)  # type: ignore[arg-type]

    def spawn(self, argv: list[str], name: str = "") -> ScratchAgent:
        """Start argv in a fresh agent cgroup; returns once it runs there."""
        agent_id = f"{name or 'a'}-{uuid.uuid4().hex[:6]}"
        group = self.tree.agent(agent_id)
        group.create()
        proc = subprocess.Popen(["/bin/sh", "-c", _JOIN, "sh", " ".join(group.procs_files()),
                                 *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        agent = ScratchAgent(agent_id, name or agent_id, group, proc)
        self.agents.append(agent)
        deadline = time.monotonic() + 10
        while proc.pid not in group.pids():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv} never joined {group.v2}")
            time.sleep(0.005)
        return agent

    def end(self, agent: ScratchAgent) -> None:
        """Kill the agent's cgroup, reap, remove it."""
        agent.kill_requested = True
        agent.cgroup.kill()
        agent.cgroup.wait_empty(time.monotonic() + 10)
        agent.proc.wait(timeout=10)
        agent.is_ended = agent.removed = True
        if not agent.cgroup.remove():
            raise RuntimeError(f"cannot remove {agent.cgroup.v2}")

    def close(self) -> None:
        """End every agent, then remove the subtree; raises if anything stays behind."""
        failed = []
        for agent in self.agents:
            if not agent.removed:
                try:
                    self.end(agent)
                except Exception as err:
                    failed.append(f"{agent.id}: {err}")
        if not self.tree.remove():
            failed.append(f"cannot remove {self.tree.base_v2}")
        if failed:
            raise RuntimeError("; ".join(failed))
