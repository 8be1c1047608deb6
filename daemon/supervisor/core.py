"""Supervisor: the registry of agents and the actions on them.

Layering: the API calls this; this calls cgroups, auth and audit.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

from agentd.v1 import agentd_pb2

from daemon.audit import AuditLog
from daemon.auth import VerifiedCommand
from daemon.cgroups.tree import AgentCgroup, AgentTree, Limits, kill_all
from daemon.config import Config
from daemon.errors import (
    AgentdError,
    AgentExists,
    AgentNotFound,
    CgroupError,
    InvalidArgument,
    LaunchFailed,
)
from daemon.supervisor import killer, launcher
from daemon.supervisor.agent import Agent, State
from daemon.supervisor.gate import CommandGate
from daemon.supervisor.reactor import LogSink, Reactor
from daemon.users import AgentUser, resolve

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_ARGV_BYTES = 32768
MIN_MEMORY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class StopResult:
    agent: Agent
    outcome: killer.KillOutcome


class Supervisor:
    def __init__(self, cfg: Config, tree: AgentTree, gate: CommandGate, audit: AuditLog) -> None:
        self.cfg = cfg
        self.tree = tree
        self.gate = gate
        self.audit = audit
        self.reactor = Reactor()
        # name -> newest agent of that name. Read without a lock on the kill
        # path (a dict lookup is atomic under the GIL); written under
        # _launch_lock, which guards name reservation only.
        self._agents: dict[str, Agent] = {}
        self._launch_lock = threading.Lock()
        self._reserved: set[str] = set()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Prepare cgroups, kill leftovers of an earlier run, start the reactor.

        Returns the ids of leftover agent cgroups that were killed. Agents
        left by an earlier run are never re-adopted: nobody has watched them
        since the daemon died, so they are killed and audited.
        """
        self.tree.prepare()
        killed = self._kill_leftovers()
        self.reactor.start()
        return killed

    def _kill_leftovers(self) -> list[str]:
        leftovers = self.tree.leftovers()
        if not leftovers:
            return []
        counts = {g.agent_id: len(_safe_pids(g)) for g in leftovers}
        kill_all(leftovers)
        ids = []
        for g in leftovers:
            empty = g.wait_empty(time.monotonic() + self.cfg.kill_verify_timeout_s)
            removed = g.remove()
            self.audit.append(
                "leftover_agent_killed",
                agent_id=g.agent_id,
                processes_killed=counts[g.agent_id],
                verified_empty=empty,
                cgroup_removed=removed,
            )
            ids.append(g.agent_id)
        return ids

    def shutdown(self) -> int:
        """Kill every running agent (fail closed: no daemon, no agents) and stop the reactor."""
        running = [a for a in list(self._agents.values()) if not a.is_ended]
        for a in running:
            a.kill_requested = True
        kill_all(a.cgroup for a in running)
        for a in running:
            empty = a.cgroup.wait_empty(time.monotonic() + self.cfg.kill_verify_timeout_s)
            a.ended.wait(timeout=2.0)
            self.audit.append("agent_killed_at_shutdown", name=a.name, agent_id=a.id,
                              verified_empty=empty)
        self.reactor.stop()
        for a in self._agents.values():
            a.cgroup.remove(timeout=0.5)
        self.tree.remove()
        return len(running)

    # --------------------------------------------------------------- reads
    def get(self, name: str) -> Agent:
        agent = self._agents.get(name)
        if agent is None:
            raise AgentNotFound(f"no agent named {name!r} (see 'agentctl ps')")
        return agent

    def agents(self) -> list[Agent]:
        return sorted(self._agents.values(), key=lambda a: a.name)

    # ----------------------------------------------------------------- run
    def run(self, envelope: agentd_pb2.Envelope) -> Agent:
        """Verify, then launch. Raises AgentdError (audited)."""
        vc = self.gate.admit(envelope, "run")
        action = vc.command.run
        try:
            self._validate_run(action)
            user = resolve(action.user or self.cfg.default_user,
                           allow_root=self.cfg.allow_root_agents)
        except AgentdError as err:
            self.gate.audit_rejection(envelope, "run", err)
            raise
        # A run is not the stop path: persist the replay record before acting,
        # so a crash right after cannot let the same run be replayed.
        self.gate.replay.persist()
        self.gate.audit_accepted(vc, action.name, argv=list(action.argv), user=user.name)
        with self._launch_lock:
            current = self._agents.get(action.name)
            if action.name in self._reserved or (current and not current.is_ended):
                exists = AgentExists(
                    f"an agent named {action.name!r} is already running; stop it first "
                    "or pick another name")
                self.audit.append("result", command_id=vc.command_id.hex(), ok=False,
                                  error=exists.message)
                raise exists
            self._reserved.add(action.name)
        try:
            agent = self._launch(vc, action, user)
        except (LaunchFailed, CgroupError) as err:
            self.audit.append("result", command_id=vc.command_id.hex(), ok=False,
                              error=err.message)
            raise
        finally:
            with self._launch_lock:
                self._reserved.discard(action.name)
        self.audit.append(
            "result", command_id=vc.command_id.hex(), ok=True, name=agent.name,
            agent_id=agent.id, main_pid=agent.main_pid, cgroups=agent.cgroup.paths(),
        )
        return agent

    def _validate_run(self, action: agentd_pb2.RunAction) -> None:
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

    def _launch(
        self, vc: VerifiedCommand, action: agentd_pb2.RunAction, user: AgentUser
    ) -> Agent:
        agent_id = f"{action.name}-{secrets.token_hex(4)}"
        limits = self._limits_for(action.resources)
        group = self.tree.agent(agent_id)
        try:
            group.create()
            group.apply_limits(limits)
            self.cfg.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            stdout_log = self.cfg.log_dir / f"{agent_id}.stdout.log"
            stderr_log = self.cfg.log_dir / f"{agent_id}.stderr.log"
            env = {
                "PATH": self.cfg.agent_path,
                "HOME": "/",
                "USER": user.name,
                "LOGNAME": user.name,
                "LANG": "C.UTF-8",
                "AGENTD_AGENT_NAME": action.name,
                "AGENTD_AGENT_ID": agent_id,
            }
            spawned = launcher.spawn(cgroup=group, argv=list(action.argv), user=user, env=env)
        except BaseException:
            self._discard_cgroup(group)
            raise
        pid = spawned.proc.pid
        agent = Agent(
            name=action.name, id=agent_id, argv=list(action.argv), user=user, limits=limits,
            cgroup=group, started_by=",".join(vc.principals), stdout_log=stdout_log,
            stderr_log=stderr_log, proc=spawned.proc, main_pid=pid,
            started_at=launcher.proc_start_time(pid),
        )
        cap = self.cfg.log_cap_bytes
        self.reactor.watch_output(spawned.stdout_fd, LogSink(stdout_log, cap))
        self.reactor.watch_output(spawned.stderr_fd, LogSink(stderr_log, cap))
        pidfd = os.pidfd_open(pid)
        self.reactor.watch_exit(pidfd, lambda: self._on_main_exit(agent))
        with self._launch_lock:
            self._agents[action.name] = agent
        return agent

    def _limits_for(self, r: agentd_pb2.Resources) -> Limits:
        """Requested limits, with the daemon's defaults where none was asked for.

        A limit the operator asked for must be enforced or the run refused
        (apply_limits raises). A default is applied only where a hierarchy
        holds its controller; start() warns about the ones that cannot be.
        """
        layout = self.tree.layout
        memory = r.memory_bytes or (
            self.cfg.default_memory_bytes if layout.holder("memory") else 0)
        pids = r.pids_max or (self.cfg.default_pids_max if layout.holder("pids") else 0)
        return Limits(memory_bytes=memory, pids_max=pids, cpu_millis=r.cpu_millis)

    def unenforceable_defaults(self) -> list[str]:
        """Default limits this host cannot enforce (no controller for them)."""
        layout = self.tree.layout
        out = []
        if self.cfg.default_pids_max and not layout.holder("pids"):
            out.append("pids")
        if self.cfg.default_memory_bytes and not layout.holder("memory"):
            out.append("memory")
        return out

    def _discard_cgroup(self, group: AgentCgroup) -> None:
        try:
            group.kill()
            group.wait_empty(time.monotonic() + self.cfg.kill_verify_timeout_s)
            group.remove()
        except CgroupError:
            log.exception("cannot clean up cgroup of a failed launch")

    def _on_main_exit(self, agent: Agent) -> None:
        """The main process exited: reap it, kill what it left, record the end.

        Like systemd's KillMode=control-group, processes the main one leaves
        behind (daemonised children) are killed: nothing runs unwatched.
        """
        rc = agent.proc.wait()
        agent.record_exit(rc)
        group = agent.cgroup
        leftovers = 0
        try:
            if group.populated():
                leftovers = len(_safe_pids(group))
                group.kill()
            empty = group.wait_empty(time.monotonic() + self.cfg.kill_verify_timeout_s)
            while not empty:
                # Stuck (D state) members: keep watching without hanging a worker for long.
                time.sleep(0.5)
                empty = not group.populated()
        except CgroupError:
            log.exception("finalising agent %s", agent.id)
        agent.oom_kills = group.oom_kills()
        agent.mark_ended()
        group.remove()
        self.audit.append(
            "agent_ended", name=agent.name, agent_id=agent.id, state=agent.state.value,
            exit_code=agent.exit_code, exit_signal=agent.exit_signal,
            leftover_processes_killed=leftovers, oom_kills=agent.oom_kills,
        )

    # ----------------------------------------------------------- stop/kill
    def kill(self, envelope: agentd_pb2.Envelope) -> StopResult:
        vc = self.gate.admit(envelope, "kill")
        accepted = time.monotonic()
        agent = self._target(envelope, "kill", vc.command.kill.name)
        outcome = killer.kill(agent, accepted_at=accepted,
                              verify_timeout=self.cfg.kill_verify_timeout_s)
        if outcome.verified_empty and not outcome.already_ended:
            agent.set_state(State.KILLED)
        self._after_stop(vc, agent, outcome)
        return StopResult(agent, outcome)

    def stop(self, envelope: agentd_pb2.Envelope) -> StopResult:
        vc = self.gate.admit(envelope, "stop")
        accepted = time.monotonic()
        action = vc.command.stop
        agent = self._target(envelope, "stop", action.name)
        grace = self.cfg.default_grace_s if not action.HasField("grace_ms") else (
            action.grace_ms / 1000.0)
        if grace > self.cfg.max_grace_s:
            err = InvalidArgument(
                f"grace period {grace:g}s exceeds the daemon's maximum of "
                f"{self.cfg.max_grace_s:g}s")
            self.gate.audit_rejection(envelope, "stop", err)
            raise err
        outcome = killer.stop(agent, accepted_at=accepted, grace=grace,
                              verify_timeout=self.cfg.kill_verify_timeout_s)
        if outcome.verified_empty and not outcome.already_ended:
            agent.set_state(State.KILLED)
        self._after_stop(vc, agent, outcome)
        return StopResult(agent, outcome)

    def _target(self, envelope: agentd_pb2.Envelope, rpc: str, name: str) -> Agent:
        agent = self._agents.get(name)
        if agent is None:
            err = AgentNotFound(f"no agent named {name!r} (see 'agentctl ps')")
            self.gate.audit_rejection(envelope, rpc, err)
            raise err
        return agent

    def _after_stop(self, vc: VerifiedCommand, agent: Agent, out: killer.KillOutcome) -> None:
        """Everything slow, after the kill: audit the command and result, persist replay."""
        self.gate.audit_accepted(vc, agent.name, agent_id=agent.id)
        self.audit.append(
            "result", command_id=vc.command_id.hex(), ok=out.verified_empty, name=agent.name,
            agent_id=agent.id, action=vc.action, processes_killed=out.processes_killed,
            duration_ms=round(out.duration_ms, 3), verified_empty=out.verified_empty,
            method=out.method, already_ended=out.already_ended,
            terminated_by_sigterm=out.terminated_by_sigterm,
            stuck=[{"pid": s.pid, "state": s.state, "wchan": s.wchan} for s in out.stuck],
        )
        self.gate.replay.persist()


def _safe_pids(group: AgentCgroup) -> list[int]:
    try:
        return group.pids()
    except CgroupError:
        return []

