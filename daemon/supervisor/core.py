"""Supervisor: the registry of agents and the actions on them.

Layering: the API calls this; this calls cgroups, auth and audit.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agentd.v1 import agentd_pb2

from daemon.audit import AuditLog
from daemon.auth import VerifiedCommand
from daemon.cgroups.tree import AgentCgroup, AgentTree, kill_all
from daemon.config import Config
from daemon.errors import (
    AgentExists,
    AgentNotFound,
    CgroupError,
    FailedPrecondition,
    InvalidArgument,
    LaunchFailed,
    PermissionDenied,
)
from daemon.supervisor import killer, launcher, runspec
from daemon.supervisor.agent import Agent, State
from daemon.supervisor.enforcer import Enforcer, Expired
from daemon.supervisor.gate import CommandGate
from daemon.supervisor.latch import Latch
from daemon.supervisor.reactor import LogSink, Reactor
from daemon.users import AgentUser, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopResult:
    agent: Agent
    outcome: killer.KillOutcome


@dataclass(frozen=True)
class RenewResult:
    agent: Agent
    ttl_ms: int
    remaining_s: float


@dataclass
class EstopResult:
    results: list[StopResult] = field(default_factory=list)
    duration_ms: float = 0.0


class Supervisor:
    def __init__(self, cfg: Config, tree: AgentTree, gate: CommandGate, audit: AuditLog) -> None:
        self.cfg = cfg
        self.tree = tree
        self.gate = gate
        self.audit = audit
        self.reactor = Reactor()
        self.enforcer = Enforcer(self._on_expired, reactor_tick=lambda: self.reactor.last_tick)
        self.latch = Latch(cfg.latch_path)
        # Verifies lease kills and nothing else: sharing the finalisers' pool
        # would stamp a cgroup empty only when a busy worker got round to it.
        self._verifier = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agentd-verify")
        # name -> newest agent of that name. Read without a lock on the kill
        # path (a dict lookup is atomic under the GIL); written under
        # _launch_lock, which guards name reservation only.
        self._agents: dict[str, Agent] = {}
        self._launch_lock = threading.Lock()
        self._reserved: set[str] = set()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Prepare cgroups, kill leftovers of an earlier run, start the loops.

        Returns the ids of leftover agent cgroups that were killed. Agents
        left by an earlier run are never re-adopted: nobody has watched them
        since the daemon died, so they are killed and audited.
        """
        self.tree.prepare()
        killed = self._kill_leftovers()
        self.reactor.start()
        self.enforcer.start()
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
        """Kill every running agent (fail closed: no daemon, no agents) and stop the loops.

        The enforcement loop, and so the guardian's heartbeat, runs until the
        kills are verified: a slow shutdown must not look like a stall.
        """
        running = self._running()
        for a in running:
            a.request_end("daemon_shutdown")
        kill_all(a.cgroup for a in running)
        for a in running:
            empty = a.cgroup.wait_empty(time.monotonic() + self.cfg.kill_verify_timeout_s)
            a.ended.wait(timeout=2.0)
            self.audit.append("agent_killed_at_shutdown", name=a.name, agent_id=a.id,
                              verified_empty=empty)
        self.enforcer.stop()
        self.reactor.stop()
        self._verifier.shutdown(wait=True)
        for a in self._agents.values():
            a.cgroup.remove(timeout=0.5)
        self.tree.remove()
        return len(running)

    def unenforceable_defaults(self) -> list[str]:
        """Default limits this host cannot enforce (no controller for them)."""
        layout = self.tree.layout
        out = []
        if self.cfg.default_pids_max and not layout.holder("pids"):
            out.append("pids")
        if self.cfg.default_memory_bytes and not layout.holder("memory"):
            out.append("memory")
        return out

    def status_line(self) -> str:
        """One line for humans (systemd STATUS=): agents, latch, leases."""
        running = self._running()
        leased = sum(1 for a in running if a.lease_ttl_ms)
        latch = self.latch.state
        parts = [f"{len(running)} agent(s) running", f"{leased} under lease"]
        if latch is not None:
            parts.append(f"EMERGENCY STOP LATCHED ({latch.reason})")
        return "; ".join(parts)

    def _running(self) -> list[Agent]:
        return [a for a in list(self._agents.values()) if not a.is_ended]

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
        def precheck(vc: VerifiedCommand) -> tuple[runspec.RunSpec, AgentUser]:
            self.latch.refuse_run(self.cfg.reset_signatures)
            spec = runspec.check(vc.command.run, self.cfg, self.tree.layout)
            user = resolve(vc.command.run.user or self.cfg.default_user,
                           allow_root=self.cfg.allow_root_agents)
            return spec, user

        vc, (spec, user) = self.gate.admit(envelope, "run", precheck)
        action = vc.command.run
        # A run is not the stop path: persist the replay record before acting,
        # so a crash right after cannot let the same run be replayed.
        self.gate.replay.persist()
        self.gate.audit_accepted(vc, action.name, argv=list(action.argv), user=user.name,
                                 lease_ms=spec.lease_ms, max_runtime_ms=spec.max_runtime_ms)
        with self._launch_lock:
            current = self._agents.get(action.name)
            if action.name in self._reserved or (current and not current.is_ended):
                exists = AgentExists(
                    f"an agent named {action.name!r} is already running; stop it first "
                    "or pick another name")
                self._audit_result(vc, ok=False, error=exists.message)
                raise exists
            self._reserved.add(action.name)
        try:
            agent = self._launch(vc, action, user, spec)
        except (LaunchFailed, CgroupError) as err:
            self._audit_result(vc, ok=False, error=err.message)
            raise
        finally:
            with self._launch_lock:
                self._reserved.discard(action.name)
        if self.latch.latched:
            # An estop landed while this agent was starting, after its
            # snapshot of running agents: this agent must not survive it.
            agent.request_end("estop")
            killer.kill(agent, accepted_at=time.monotonic(),
                        verify_timeout=self.cfg.kill_verify_timeout_s)
            late = FailedPrecondition("emergency stop latched while the agent was starting; "
                                      "it was killed")
            self._audit_result(vc, ok=False, error=late.message, agent_id=agent.id)
            raise late
        self._audit_result(vc, ok=True, name=agent.name, agent_id=agent.id,
                           main_pid=agent.main_pid, cgroups=agent.cgroup.paths())
        return agent

    def _launch(self, vc: VerifiedCommand, action: agentd_pb2.RunAction, user: AgentUser,
                spec: runspec.RunSpec) -> Agent:
        agent_id = f"{action.name}-{secrets.token_hex(4)}"
        group = self.tree.agent(agent_id)
        try:
            group.create()
            group.apply_limits(spec.limits)
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
            spawned = launcher.spawn(cgroup=group, argv=list(action.argv), user=user, env=env,
                                     nofile=self.cfg.agent_nofile)
        except BaseException:
            self._discard_cgroup(group)
            raise
        started = time.monotonic()
        pid = spawned.proc.pid
        agent = Agent(
            name=action.name, id=agent_id, argv=list(action.argv), user=user,
            limits=spec.limits, cgroup=group, started_by=",".join(vc.principals),
            stdout_log=stdout_log, stderr_log=stderr_log, proc=spawned.proc, main_pid=pid,
            started_at=launcher.proc_start_time(pid), lease_ttl_ms=spec.lease_ms,
            max_runtime_ms=spec.max_runtime_ms,
        )
        cap = self.cfg.log_cap_bytes
        self.reactor.watch_output(spawned.stdout_fd, LogSink(stdout_log, cap))
        self.reactor.watch_output(spawned.stderr_fd, LogSink(stderr_log, cap))
        if spec.lease_ms:
            self.enforcer.set(agent, "lease", started + spec.lease_ms / 1000)
        if spec.max_runtime_ms:
            self.enforcer.set(agent, "max_runtime", started + spec.max_runtime_ms / 1000)
        pidfd = os.pidfd_open(pid)
        self.reactor.watch_exit(pidfd, lambda: self._on_main_exit(agent))
        with self._launch_lock:
            self._agents[action.name] = agent
        return agent

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
        self.enforcer.clear(agent)
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
            end_reason=agent.end_reason, exit_code=agent.exit_code,
            exit_signal=agent.exit_signal, leftover_processes_killed=leftovers,
            oom_kills=agent.oom_kills,
        )

    # ----------------------------------------------------------- stop/kill
    def kill(self, envelope: agentd_pb2.Envelope) -> StopResult:
        vc, agent = self.gate.admit(envelope, "kill", lambda vc: self.get(vc.command.kill.name))
        accepted = time.monotonic()
        agent.request_end("killed")
        outcome = killer.kill(agent, accepted_at=accepted,
                              verify_timeout=self.cfg.kill_verify_timeout_s)
        self._settle(agent, outcome)
        self._after_stop(vc, agent, outcome)
        return StopResult(agent, outcome)

    def stop(self, envelope: agentd_pb2.Envelope) -> StopResult:
        def precheck(vc: VerifiedCommand) -> tuple[Agent, float]:
            action = vc.command.stop
            grace = self.cfg.default_grace_s if not action.HasField("grace_ms") else (
                action.grace_ms / 1000.0)
            if grace > self.cfg.max_grace_s:
                raise InvalidArgument(
                    f"grace period {grace:g}s exceeds the daemon's maximum of "
                    f"{self.cfg.max_grace_s:g}s")
            return self.get(action.name), grace

        vc, (agent, grace) = self.gate.admit(envelope, "stop", precheck)
        accepted = time.monotonic()
        agent.request_end("stopped")
        outcome = killer.stop(agent, accepted_at=accepted, grace=grace,
                              verify_timeout=self.cfg.kill_verify_timeout_s)
        self._settle(agent, outcome)
        self._after_stop(vc, agent, outcome)
        return StopResult(agent, outcome)

    def _settle(self, agent: Agent, outcome: killer.KillOutcome) -> None:
        self.enforcer.clear(agent)
        if outcome.verified_empty and not outcome.already_ended:
            agent.set_state(State.KILLED)

    def _after_stop(self, vc: VerifiedCommand, agent: Agent, out: killer.KillOutcome) -> None:
        """Everything slow, after the kill: audit the command and result, persist replay."""
        self.gate.audit_accepted(vc, agent.name, agent_id=agent.id)
        self._audit_result(vc, **_outcome_fields(agent, out), action=vc.action)
        self.gate.replay.persist()

    def _audit_result(self, vc: VerifiedCommand, **fields: object) -> None:
        fields.setdefault("ok", True)
        self.audit.append("result", command_id=vc.command_id.hex(), **fields)

    # --------------------------------------------------------------- leases
    def renew(self, envelope: agentd_pb2.Envelope) -> RenewResult:
        """Extend an agent's lease to ttl from now. Raises AgentdError (audited)."""
        def precheck(vc: VerifiedCommand) -> Agent:
            runspec.check_ttl(vc.command.renew.ttl_ms, self.cfg)
            agent = self.get(vc.command.renew.name)
            if agent.kill_requested or agent.is_ended:
                raise _ended(agent)
            return agent

        vc, agent = self.gate.admit(envelope, "renew", precheck)
        action = vc.command.renew
        if not self.enforcer.renew(agent, time.monotonic() + action.ttl_ms / 1000):
            # The lease ran out between the check and now.
            err = _ended(agent)
            self.gate.audit_rejection(envelope, "renew", err)
            raise err
        agent.lease_ttl_ms = action.ttl_ms
        self.gate.audit_accepted(vc, agent.name, agent_id=agent.id, ttl_ms=action.ttl_ms)
        self.gate.replay.persist()
        remaining = self.enforcer.remaining(agent, "lease") or 0.0
        return RenewResult(agent, action.ttl_ms, remaining)

    def _on_expired(self, expired: Expired) -> None:
        """Called from the enforcement loop: hard-kill expired leases, stop overrun agents.

        The loop must keep ticking (it is the watchdogs' heartbeat), so it
        only writes cgroup.kill for every expired lease, which is fast; the
        verification, audit and any stop with a grace period run in the pool.
        """
        leases = [(a, at) for a, kind, at in expired if kind == "lease" and not a.is_ended]
        for a, _ in leases:
            a.request_end("lease_expired")
        kill_all(a.cgroup for a, _ in leases)
        killed_at = time.monotonic()
        if leases:
            self._verifier.submit(self._verify_expiries, leases, killed_at)
        for a, kind, _ in expired:
            if kind == "max_runtime" and not a.is_ended:
                a.request_end("max_runtime")
                self.reactor.pool.submit(self._stop_overrun, a)

    def _verify_expiries(self, leases: list[tuple[Agent, float]], killed_at: float) -> None:
        """Wait for every expired agent's cgroup to empty, then audit each.

        One task for the whole batch: polling them together stamps each one
        as it empties, where a task per agent would queue later agents behind
        earlier agents' audit fsyncs and report that queueing as kill time.
        """
        pending = dict(leases)
        emptied: dict[Agent, float] = {}
        give_up = time.monotonic() + self.cfg.kill_verify_timeout_s
        delay = 20e-6
        while pending and time.monotonic() < give_up:
            for a in [a for a in pending if not a.cgroup.populated()]:
                emptied[a] = time.monotonic()
                del pending[a]
            if pending:
                time.sleep(delay)
                delay = min(delay * 2, 1e-3)
        for a, _ in leases:
            if a in emptied:
                a.set_state(State.KILLED)
        # fsync'd audit records go to the general pool, not this verifier.
        self.reactor.pool.submit(self._audit_expiries, leases, killed_at, emptied)

    def _audit_expiries(self, leases: list[tuple[Agent, float]], killed_at: float,
                        emptied: dict[Agent, float]) -> None:
        for a, deadline in leases:
            done = emptied.get(a)
            self.audit.append(
                "lease_expired", name=a.name, agent_id=a.id, ttl_ms=a.lease_ttl_ms,
                verified_empty=done is not None,
                # How late the kill was written, and how long from the deadline
                # until the kernel reported the cgroup empty.
                deadline_to_kill_ms=round((killed_at - deadline) * 1e3, 3),
                deadline_to_empty_ms=None if done is None else round((done - deadline) * 1e3, 3),
                stuck=[s.pid for s in a.cgroup.stuck()] if done is None else [],
            )

    def _stop_overrun(self, agent: Agent) -> None:
        out = killer.stop(agent, accepted_at=time.monotonic(), grace=self.cfg.default_grace_s,
                          verify_timeout=self.cfg.kill_verify_timeout_s)
        self._settle(agent, out)
        self.audit.append("max_runtime_reached", max_runtime_ms=agent.max_runtime_ms,
                          **_outcome_fields(agent, out))

    # --------------------------------------------------------------- estop
    def estop(self, envelope: agentd_pb2.Envelope) -> EstopResult:
        """Kill every agent at once, then latch. Raises AgentdError (audited)."""
        vc, _ = self.gate.admit(envelope, "estop")
        accepted = time.monotonic()
        # The latch first, in memory: from here no run can start, and a run
        # already starting kills its own agent when it sees the latch.
        self.latch.engage(vc.command.reason or "emergency stop", ",".join(vc.principals))
        running = self._running()
        before = {a.id: _safe_pids(a.cgroup) for a in running}
        for a in running:
            a.request_end("estop")
        kill_all(a.cgroup for a in running)
        deadline = time.monotonic() + self.cfg.kill_verify_timeout_s
        result = EstopResult()
        for a in running:
            empty = a.cgroup.wait_empty(deadline)
            out = killer.KillOutcome(
                processes_killed=len(before[a.id]), verified_empty=empty,
                duration_ms=(time.monotonic() - accepted) * 1e3,
                method="cgroup.kill" if self.tree.has_cgroup_kill else "freeze-and-kill",
                stuck=[] if empty else a.cgroup.stuck())
            self._settle(a, out)
            result.results.append(StopResult(a, out))
        result.duration_ms = (time.monotonic() - accepted) * 1e3
        # Everything slow, after the kill.
        self.latch.persist()
        self.gate.audit_accepted(vc, "*")
        self._audit_result(
            vc, action="estop", agents_killed=len(running),
            processes_killed=sum(r.outcome.processes_killed for r in result.results),
            all_verified_empty=all(r.outcome.verified_empty for r in result.results),
            duration_ms=round(result.duration_ms, 3), latched=True,
            agents=[r.agent.id for r in result.results])
        self.gate.replay.persist()
        return result

    def reset(self, envelope: agentd_pb2.Envelope) -> tuple[str, ...]:
        """Clear the latch if enough distinct principals signed. Returns them."""
        def quorum(vc: VerifiedCommand) -> tuple[str, ...]:
            # Count distinct principals among the signers whose role allows a
            # reset; verify() already collapsed signatures to distinct keys.
            principals = tuple(sorted({k.principal for k in vc.authorized}))
            needed = self.cfg.reset_signatures
            if len(principals) < needed:
                raise PermissionDenied(
                    f"reset needs signatures from {needed} distinct principals with role admin "
                    f"or operator; this one has {len(principals)} ({', '.join(principals)}). "
                    "Add one with 'agentctl cosign FILE --key OTHER_KEY'")
            return principals

        vc, principals = self.gate.admit(envelope, "reset", quorum)
        cleared = self.latch.clear()
        self.gate.audit_accepted(vc, "*", reset_principals=list(principals),
                                 was_latched=cleared is not None)
        self.gate.replay.persist()
        return principals


def _ended(agent: Agent) -> FailedPrecondition:
    return FailedPrecondition(
        f"agent {agent.name!r} has ended or is being ended "
        f"({agent.end_reason or agent.state.value}); a renew cannot bring it back")


def _outcome_fields(agent: Agent, out: killer.KillOutcome) -> dict[str, object]:
    return {
        "ok": out.verified_empty, "name": agent.name, "agent_id": agent.id,
        "processes_killed": out.processes_killed, "duration_ms": round(out.duration_ms, 3),
        "verified_empty": out.verified_empty, "method": out.method,
        "already_ended": out.already_ended, "terminated_by_sigterm": out.terminated_by_sigterm,
        "stuck": [{"pid": s.pid, "state": s.state, "wchan": s.wchan} for s in out.stuck],
    }


def _safe_pids(group: AgentCgroup) -> list[int]:
    try:
        return group.pids()
    except CgroupError:
        return []
