"""Supervisor records to protobuf messages. Facts come from the kernel at read time."""

from __future__ import annotations

from agentd.v1 import agentd_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.cgroups.tree import AgentCgroup
from daemon.errors import CgroupError
from daemon.monitor.model import Signals
from daemon.sandbox.verify import Report
from daemon.supervisor.agent import Agent, State
from daemon.supervisor.egress import AgentEgress
from daemon.supervisor.killer import KillOutcome

_STATES = {
    State.RUNNING: agentd_pb2.AGENT_STATE_RUNNING,
    State.STOPPING: agentd_pb2.AGENT_STATE_STOPPING,
    State.EXITED: agentd_pb2.AGENT_STATE_EXITED,
    State.KILLED: agentd_pb2.AGENT_STATE_KILLED,
    State.FROZEN: agentd_pb2.AGENT_STATE_FROZEN,
}


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _live_facts(group: AgentCgroup) -> tuple[list[int], int]:
    try:
        return group.pids(), group.memory_bytes()
    except CgroupError:
        return [], 0


def agent(a: Agent, lease_remaining_s: float | None = None,
          sampled_at: float | None = None) -> agentd_pb2.Agent:
    """The Agent message: pids and memory read from cgroupfs now.

    sampled_at: when the sampler last verified the signals (Sampler.sampled_at).
    """
    pids, memory = ([], 0) if a.is_ended else _live_facts(a.cgroup)
    msg = agentd_pb2.Agent(
        name=a.name,
        id=a.id,
        state=_STATES[a.state],
        pids=pids,
        memory_bytes=memory,
        cgroup_paths=a.cgroup.paths(),
        main_pid=a.main_pid,
        started_at=_ts(a.started_at),
        user=a.user.name,
        uid=a.user.uid,
        argv=a.argv,
        resources=agentd_pb2.Resources(
            memory_bytes=a.limits.memory_bytes,
            pids_max=a.limits.pids_max,
            cpu_millis=a.limits.cpu_millis,
        ),
        stdout_log=str(a.stdout_log),
        stderr_log=str(a.stderr_log),
        started_by=a.started_by,
        lease_ttl_ms=a.lease_ttl_ms,
        max_runtime_ms=a.max_runtime_ms,
        end_reason=a.end_reason if a.is_ended else "",
        oom_kills=a.oom_kills,
        signals=signals(a.signals, sampled_at, a.started_at),
    )
    if a.sandbox is not None:
        msg.sandbox.CopyFrom(sandbox(a.sandbox))
    if a.egress is not None:
        _egress(msg.sandbox, a.egress)
    if lease_remaining_s is not None and not a.is_ended:
        msg.lease_remaining_ms = lease_remaining_s * 1e3
    if a.exit_code is not None:
        msg.exit_code = a.exit_code
    if a.exit_signal is not None:
        msg.exit_signal = a.exit_signal
    if a.ended_at is not None:
        msg.ended_at.CopyFrom(_ts(a.ended_at))
    return msg


def sandbox(r: Report) -> agentd_pb2.Sandbox:
    """The sandbox as asked for, and each restriction as the daemon read it back at launch."""
    return agentd_pb2.Sandbox(
        policy=r.policy,
        network=r.network,
        user=r.user,
        scratch_bytes=r.scratch_bytes,
        entrypoint_sha256=r.entrypoint_sha256,
        checks=[agentd_pb2.RestrictionCheck(name=c.name, ok=c.ok, detail=c.detail)
                for c in r.checks],
        view=[agentd_pb2.ViewEntry(path=m.path, writable=m.writable, kind=m.kind,
                                   source=m.source, why=m.why) for m in r.view],
    )


def _egress(box: agentd_pb2.Sandbox, e: AgentEgress) -> None:
    """An allowlist agent's entries in force, its cap, and its recent flows."""
    box.allow.extend(e.allow)
    box.egress_byte_cap = e.byte_cap
    box.cut = e.cut
    for f in e.recent_flows():
        flow = box.recent_flows.add(
            verdict=str(f.get("verdict", "")), reason=str(f.get("reason", "")),
            name=str(f.get("name") or ""), addr=str(f.get("addr") or ""),
            port=int(f.get("port") or 0), via=str(f.get("via", "")),
            bytes_out=int(f.get("bytes_out") or 0), bytes_in=int(f.get("bytes_in") or 0),
            duration_s=float(f.get("duration_s") or 0.0), open=f.get("phase") == "open")
        flow.at.CopyFrom(_ts(float(f.get("at") or 0.0)))


def signals(s: Signals, sampled_at: float | None = None,
            started_at: float = 0.0) -> agentd_pb2.AgentSignals:
    """The newest sample of an agent's kernel-observed signals; all zero before the first.

    sampled_at, if later than the sample's own: the sampler verified then
    that nothing of the agent ran since (its uptime is as of then too).
    """
    at = s.sampled_at
    uptime = s.uptime_s
    if sampled_at is not None and sampled_at > at and at:
        at, uptime = sampled_at, max(uptime, sampled_at - started_at)
    msg = agentd_pb2.AgentSignals(
        uptime_s=uptime,
        processes_started=s.processes_started,
        processes_per_second=s.processes_per_second,
        recent_commands=s.recent_commands,
        cpu_seconds=s.cpu_seconds,
        cpu_percent=s.cpu_percent,
        memory_bytes=s.memory_bytes,
        pids=s.pids,
        sockets_open=s.sockets_open,
        connections=s.connections,
        remote_addresses=s.remote_addresses,
        files_written=s.files_written,
        oom_kills=s.oom_kills,
        tripwire_hits=s.tripwire_hits,
        egress_denied=s.egress_denied,
        egress_bytes=s.egress_bytes,
        egress_flows_open=s.egress_flows_open,
    )
    if at:
        msg.sampled_at.CopyFrom(_ts(at))
    return msg


def kill_result(a: Agent, out: KillOutcome) -> agentd_pb2.KillResult:
    return agentd_pb2.KillResult(
        name=a.name,
        id=a.id,
        processes_killed=out.processes_killed,
        duration_ms=out.duration_ms,
        verified_empty=out.verified_empty,
        stuck=[
            agentd_pb2.StuckProcess(pid=s.pid, state=s.state, wchan=s.wchan, comm=s.comm)
            for s in out.stuck
        ],
        method=out.method,
        terminated_by_sigterm=out.terminated_by_sigterm,
        state=_STATES[a.state],
        already_ended=out.already_ended,
    )
