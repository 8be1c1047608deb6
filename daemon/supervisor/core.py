"""Supervisor: the registry of agents and the actions on them.

Layering: the API calls this; this calls cgroups, auth and audit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable

from agentd.v1 import agentd_pb2

from daemon import children
from daemon.audit import AuditLog
from daemon.cgroups.tree import AgentCgroup, AgentTree, kill_all, wait_all_empty
from daemon.config import Config
from daemon.errors import (
    AgentdError,
    AgentExists,
    AgentNotFound,
    CgroupError,
    EstopDuringLaunch,
    InvalidArgument,
    LaunchFailed,
    SandboxNotApplied,
    WrongRun,
)
from daemon.monitor.rules import RuleSet
from daemon.monitor.rules import builtin as builtin_rules
from daemon.monitor.sampler import Sampler
from daemon.monitor.tripwires import Tripwires
from daemon.sandbox import bwrap, seccomp
from daemon.sandbox.policy import Policies
from daemon.supervisor import freezing, killer, launcher, runspec, sandboxing
from daemon.supervisor.agent import Agent, State
from daemon.supervisor.egress import Egress
from daemon.supervisor.enforcer import Enforcer
from daemon.supervisor.failsafe import Failsafe
from daemon.supervisor.latch import Latch
from daemon.supervisor.reactor import LogSink, Reactor
from daemon.users import AgentUser, allocate_dynamic

log = logging.getLogger(__name__)
# Replaced runs whose end is remembered (WrongRun's message); a few KiB.
_REPLACED_KEPT = 256


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Supervisor:
    def __init__(self, cfg: Config, tree: AgentTree, audit: AuditLog,
                 rules: RuleSet | None = None) -> None:
        self.cfg = cfg
        self.tree = tree
        self.audit = audit
        self.reactor = Reactor()
        self.failsafe = Failsafe(self)
        self.enforcer = Enforcer(self.failsafe.on_expired,
                                 reactor_tick=lambda: self.reactor.last_tick)
        self.latch = Latch(cfg.latch_path)
        self.sampler = Sampler(self, cfg.sample_interval_s, cfg.allowed_write_prefixes,
                               kill_gate=self.reactor.kill_gate)
        self.tripwires = Tripwires(self, rules if rules is not None else builtin_rules())
        # name -> newest agent of that name. Read without a lock on the kill
        # path (a dict lookup is atomic under the GIL); written under
        # _launch_lock, which guards name reservation only.
        self._agents: dict[str, Agent] = {}
        self._launch_lock = threading.Lock()
        self._reserved: set[str] = set()
        # Dynamic uids handed out to launches still starting (under _launch_lock).
        self._reserved_uids: set[int] = set()
        # (name, agent id) -> when it ended, for runs a newer one of the same
        # name replaced (only to say so when a command names one; bounded).
        self._replaced: dict[tuple[str, str], float] = {}
        self.policies = Policies(cfg)
        # Allowlist agents' namespaces and the egress proxy (started on first use).
        self.egress = Egress(cfg, audit)
        # Whether the guardian has killed every agent cgroup (attach_guardian).
        self._guardian_acted: Callable[[], bool] = lambda: False

    def attach_guardian(self, acted: Callable[[], bool]) -> None:
        """Label agents the guardian killed: `acted` says it exited having killed them all."""
        self._guardian_acted = acted

    # ------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Prepare cgroups, kill leftovers of an earlier run, start the loops.

        Returns the ids of leftover agent cgroups that were killed. Agents
        left by an earlier run are never re-adopted: nobody has watched them
        since the daemon died, so they are killed and audited.
        """
        # A broken policy file stops the start (PolicyError), as a broken
        # config does; later breakage refuses runs until it is fixed.
        self.policies.current()
        problem = bwrap.available()
        try:
            # Compiled once each, here, rather than on the first run.
            seccomp.bpf(deny_unix=True)
            seccomp.bpf(deny_unix=False)
        except LaunchFailed as err:
            problem = problem or err.message
        if problem:
            log.warning("agents cannot be sandboxed, so every run will be refused: %s", problem)
        self.tree.prepare()
        killed = self._kill_leftovers()
        self.reactor.add_ticker(children.reap_orphans)
        self.reactor.start()
        self.enforcer.start()
        # Tripwires first: they tell the sampler which rate windows to measure.
        self.tripwires.start()
        self.sampler.start()
        return killed

    def _kill_leftovers(self) -> list[str]:
        leftovers = self.tree.leftovers()
        if not leftovers:
            return []
        counts = {g.agent_id: len(killer.pids_of(g)) for g in leftovers}
        kill_all(leftovers)
        emptied = wait_all_empty(leftovers, time.monotonic() + self.cfg.kill_verify_timeout_s)
        ids = []
        for g in leftovers:
            empty = g in emptied
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
        running = self.running()
        for a in running:
            a.request_end("daemon_shutdown")
        with self.reactor.kill_gate:
            kill_all(a.cgroup for a in running)
        emptied = wait_all_empty([a.cgroup for a in running],
                                 time.monotonic() + self.cfg.kill_verify_timeout_s)
        for a in running:
            empty = a.cgroup in emptied
            a.ended.wait(timeout=2.0)
            self.audit.append("agent_killed_at_shutdown", name=a.name, agent_id=a.id,
                              verified_empty=empty)
        self.enforcer.stop()
        self.sampler.stop()
        self.tripwires.stop()
        self.reactor.stop()
        self.failsafe.close()
        self.egress.stop()
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
        running = self.running()
        leased = sum(1 for a in running if a.lease_ttl_ms)
        latch = self.latch.state
        parts = [f"{len(running)} agent(s) running", f"{leased} under lease"]
        if latch is not None:
            parts.append(f"EMERGENCY STOP LATCHED ({latch.reason})")
        return "; ".join(parts)

    def running(self) -> list[Agent]:
        return [a for a in list(self._agents.values()) if not a.is_ended]

    # --------------------------------------------------------------- reads
    def get(self, name: str, run_id: str = "") -> Agent:
        """The newest agent named name (running or ended), or AgentNotFound.

        run_id, when given, pins the run: the agent is returned only if it
        is that run, else WrongRun. The caller acts on the object returned,
        so a run that replaces this one after the check is never touched.
        """
        if run_id and not name:
            raise InvalidArgument(
                f"the command names run {run_id!r} but no agent; a run is named by both")
        agent = self._agents.get(name)
        if agent is None:
            raise AgentNotFound(f"no agent named {name!r} (see 'agentctl ps')")
        if run_id and agent.id != run_id:
            raise self._wrong_run(agent, run_id)
        return agent

    def _wrong_run(self, current: Agent, run_id: str) -> WrongRun:
        ended = self._replaced.get((current.name, run_id))
        then = (f"; that run ended at {_utc(ended)}" if ended is not None
                else f"; this daemon knows no run {run_id!r} of {current.name!r}")
        return WrongRun(
            f"agent {current.name!r} is now run {current.id} ({current.state.value}, started at "
            f"{_utc(current.started_at)}), not {run_id!r}, which this command names{then} "
            f"— re-sign for the current run (see 'agentctl status {current.name}')")

    def agents(self) -> list[Agent]:
        return sorted(self._agents.values(), key=lambda a: a.name)

    # ----------------------------------------------------------------- run
    def check_run(self, action: agentd_pb2.RunAction, *, admin: bool,
                  reason: str) -> runspec.RunSpec:
        """The run's spec, judged before the command is admitted. Raises AgentdError.

        The latch, the sandbox policy, the escalation and the entrypoint pin:
        a refused run changes nothing.
        """
        self.latch.refuse_run(self.cfg.reset_signatures)
        return runspec.check(action, self.cfg, self.tree.layout, policies=self.policies,
                             hidden=sandboxing.hidden(self.cfg), admin=admin, reason=reason)

    def launch(self, action: agentd_pb2.RunAction, spec: runspec.RunSpec,
               started_by: str) -> Agent:
        """Reserve the name and a uid, launch, and check the sandbox. Raises AgentdError.

        An estop that lands while the agent starts kills it here (it was not
        in the estop's snapshot of running agents): EstopDuringLaunch.
        """
        named = spec.user  # None: a dynamic user, allocated under the launch lock
        with self._launch_lock:
            current = self._agents.get(action.name)
            if action.name in self._reserved or (current and not current.is_ended):
                raise AgentExists(
                    f"an agent named {action.name!r} is already running; stop it first "
                    "or pick another name")
            user = named or allocate_dynamic(
                {a.user.uid for a in self.running()} | self._reserved_uids,
                self.cfg.dynamic_uid_min, self.cfg.dynamic_uid_max)
            self._reserved.add(action.name)
            self._reserved_uids.add(user.uid)
        try:
            agent = self._launch(started_by, action, user, spec)
        finally:
            with self._launch_lock:
                self._reserved.discard(action.name)
                self._reserved_uids.discard(user.uid)
        if self.latch.latched:
            # An estop landed while this agent was starting, after its
            # snapshot of running agents: this agent must not survive it.
            self.kill_agent(agent, "estop", record=False)
            raise EstopDuringLaunch(
                "emergency stop latched while the agent was starting; it was killed",
                agent_id=agent.id)
        return agent

    def _launch(self, started_by: str, action: agentd_pb2.RunAction, user: AgentUser,
                spec: runspec.RunSpec) -> Agent:
        agent_id = f"{action.name}-{secrets.token_hex(4)}"
        group = self.tree.agent(agent_id)
        sinks: list[LogSink] = []
        agent_net = None
        try:
            group.create()
            group.apply_limits(spec.limits)
            self.cfg.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            stdout_log = self.cfg.log_dir / f"{agent_id}.stdout.log"
            stderr_log = self.cfg.log_dir / f"{agent_id}.stderr.log"
            # Made before the spawn: a log that cannot be made refuses the
            # run (LaunchFailed) instead of leaving a started agent unwatched.
            sinks.append(LogSink(stdout_log, self.cfg.log_cap_bytes))
            sinks.append(LogSink(stderr_log, self.cfg.log_cap_bytes))
            if spec.profile.network == "allowlist":
                # Before the spawn: the namespace is made and its capture
                # probed before any of the agent's code can run in it.
                agent_net = self.egress.launch(agent_id, action.name, spec.profile.allow,
                                               spec.profile.egress_byte_cap)
            # The shim joins the cgroups and drops to the agent's user, then
            # execs bwrap, which builds the sandbox unprivileged (daemon.sandbox).
            prepared = sandboxing.prepare(self.cfg, spec, user, list(action.argv),
                                          name=action.name, agent_id=agent_id,
                                          egress=agent_net)
            try:
                spawned = launcher.spawn(
                    cgroup=group, argv=prepared.argv, user=user, env=prepared.env,
                    nofile=spec.profile.nofile, keep_fds=prepared.keep_fds, no_new_privs=True,
                    netns_fd=agent_net.net.netns_fd if agent_net else None)
            except BaseException:
                prepared.close_all()
                raise
            prepared.close_ours()
        except BaseException:
            for sink in sinks:
                sink.close()
            self._discard_cgroup(group)
            self.egress.forget(agent_id)
            raise
        started = time.monotonic()
        pid = spawned.proc.pid
        try:
            agent = Agent(
                name=action.name, id=agent_id, argv=list(action.argv), user=user,
                limits=spec.limits, cgroup=group, started_by=started_by,
                stdout_log=stdout_log, stderr_log=stderr_log, proc=spawned.proc, main_pid=pid,
                started_at=launcher.proc_start_time(pid), lease_ttl_ms=spec.lease_ms,
                max_runtime_ms=spec.max_runtime_ms, helper_pids=frozenset({pid}),
                egress=agent_net,
            )
            self._watch(agent, spawned, prepared, spec, started=started, sinks=sinks)
        except BaseException as err:
            # The agent runs, but nothing watches it yet: no kill, lease or
            # estop could reach it through the registry. Kill its cgroup now.
            self._discard_cgroup(group)
            self.egress.forget(agent_id)
            spawned.proc.wait()
            for fd in (spawned.stdout_fd, spawned.stderr_fd, prepared.status_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sink in sinks:
                with contextlib.suppress(OSError):
                    sink.close()
            if isinstance(err, AgentdError):
                raise
            reason = err.strerror if isinstance(err, OSError) else repr(err)
            raise LaunchFailed(f"the agent started but could not be watched ({reason}); "
                               "it was killed") from err
        try:
            self._check_sandbox(agent, prepared, spec, user)
        finally:
            # Listed (and sampled) only once its sandbox is checked: before
            # its exec the agent's first process is still bwrap. A failed
            # one stays listed, killed, with the checks that failed.
            with self._launch_lock:
                replaced = self._agents.get(action.name)
                if replaced is not None:
                    self._remember_replaced(replaced)
                self._agents[action.name] = agent
        return agent

    def _remember_replaced(self, agent: Agent) -> None:
        """Keep when a replaced run ended, for WrongRun's message (under _launch_lock)."""
        if len(self._replaced) >= _REPLACED_KEPT:
            del self._replaced[next(iter(self._replaced))]
        # A run is replaced only once ended (launch refuses otherwise).
        ended = agent.ended_at if agent.ended_at is not None else time.time()
        self._replaced[(agent.name, agent.id)] = ended

    def _watch(self, agent: Agent, spawned: launcher.Spawned, prepared: sandboxing.Prepared,
               spec: runspec.RunSpec, *, started: float, sinks: list[LogSink]) -> None:
        """Watch the agent's output and exit, set its deadlines. Raises OSError."""
        # The pidfd first: it is the one descriptor that can fail here (EMFILE).
        pidfd = os.pidfd_open(agent.main_pid)
        for sink, stream, fd in ((sinks[0], "stdout", spawned.stdout_fd),
                                 (sinks[1], "stderr", spawned.stderr_fd)):
            sink.tap = self.tripwires.tap(agent, stream)
            self.reactor.watch_output(fd, sink)
        if spec.lease_ms:
            self.enforcer.set(agent, "lease", started + spec.lease_ms / 1000)
        if spec.max_runtime_ms:
            self.enforcer.set(agent, "max_runtime", started + spec.max_runtime_ms / 1000)
        self.reactor.watch_output(prepared.status_r, prepared.sink)
        self.reactor.watch_exit(pidfd, lambda: self._on_main_exit(agent))

    def _check_sandbox(self, agent: Agent, prepared: sandboxing.Prepared, spec: runspec.RunSpec,
                       user: AgentUser) -> None:
        """Read the agent's restrictions back from the kernel; kill it if any is missing.

        Raises LaunchFailed (bwrap never started the agent) or
        SandboxNotApplied, after a verified kill: an agent never runs with a
        restriction silently missing.
        """
        try:
            found = sandboxing.inspect(agent.cgroup, agent.main_pid, prepared, spec, user=user,
                                       stderr_log=agent.stderr_log)
        except LaunchFailed:
            self.kill_agent(agent, "sandbox_failed", record=False)
            raise
        agent.helper_pids = found.helpers
        agent.sandbox = sandboxing.report(spec, user, found.checks, prepared.view)
        failed = agent.sandbox.failed
        if failed:
            out = self.kill_agent(agent, "sandbox_not_applied", record=False)
            raise SandboxNotApplied(
                "restriction(s) not applied, so the agent was killed "
                f"({'verified' if out.verified_empty else 'NOT verified'} empty): "
                + "; ".join(f"{c.name}: {c.detail}" for c in failed))

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
                leftovers = len(killer.pids_of(group))
                group.kill(cleanup=True)
            empty = group.wait_empty(time.monotonic() + self.cfg.kill_verify_timeout_s)
            while not empty:
                # Stuck (D state) members: keep watching without hanging a worker for long.
                time.sleep(0.5)
                empty = not group.populated()
        except CgroupError:
            log.exception("finalising agent %s", agent.id)
        agent.oom_kills = group.oom_kills()
        if (agent.exit_signal == signal.SIGKILL and not agent.kill_requested
                and not agent.oom_kills and self._guardian_acted()):
            # Nobody here asked for this SIGKILL and the guardian has acted
            # (it kills every agent cgroup, then exits). An end seen before
            # it exits keeps its plain label; the guardian's report, audited
            # at the next start, names every cgroup it killed either way.
            agent.request_end("guardian")
        # bwrap's inner process, orphaned by the outer one's death: reaped now
        # rather than at the reactor's next pass.
        children.reap_orphans()
        agent.mark_ended()
        self.egress.forget(agent.id)
        group.remove()
        self.audit.append(
            "agent_ended", name=agent.name, agent_id=agent.id, state=agent.state.value,
            end_reason=agent.end_reason, exit_code=agent.exit_code,
            exit_signal=agent.exit_signal, leftover_processes_killed=leftovers,
            oom_kills=agent.oom_kills,
        )

    # ----------------------------------------------------------- stop/kill
    def settle(self, agent: Agent, outcome: killer.KillOutcome) -> None:
        # The kill already closed the agent's side of every flow (its
        # processes' sockets close as they die); this closes what a stuck
        # process could still hold, and the upstream side at once.
        self.egress.close_flows(agent.id)
        self.enforcer.clear(agent)
        if outcome.verified_empty and not outcome.already_ended:
            agent.set_state(State.KILLED)

    def kill_agent(self, agent: Agent, reason: str, *, record: bool = True) -> killer.KillOutcome:
        """Kill agent on the daemon's own authority (a tripwire, a failed launch).

        Not a signed command: the rule that fired was configured by an admin
        and is named in the audit record by the caller. record=False when
        the caller audits the failure itself (a launch refused as a result).
        """
        agent.request_end(reason)
        out = killer.kill(agent, accepted_at=time.monotonic(),
                          verify_timeout=self.cfg.kill_verify_timeout_s)
        self.settle(agent, out)
        if record:
            self.audit.append("agent_killed_by_daemon", reason=reason,
                              **killer.outcome_fields(agent, out))
        return out

    # -------------------------------------------------------------- freeze
    def freeze_agent(self, agent: Agent, frozen: bool) -> tuple[bool, float]:
        out = freezing.freeze_agent(agent, frozen)
        if frozen:
            # A frozen agent's sockets stay open: its flows are closed here.
            self.egress.close_flows(agent.id)
        return out

    def cut_agent(self, agent: Agent) -> bool:
        """Close every flow of an allowlist agent and empty its allowlist; False if none."""
        return self.egress.cut(agent.id)
