"""Turn the daemon's answers into text for people and dicts for --json.

Text is for an operator under pressure: the outcome first, units spelled
out, nothing that needs the proto to decode. JSON keeps the proto's
snake_case field names and numbers as numbers.

The text functions print the strings of a message as they are: for a
terminal, callers pass the message through Settings.shown first, which
escapes the control characters an agent may have put in any of them.
"""

from __future__ import annotations

import shlex
import signal
import textwrap
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from agentd.v1 import agentd_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from agentctl import format as fmt

_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


_TIMESTAMP = Timestamp.DESCRIPTOR.full_name


# --------------------------------------------------------------------- JSON
def to_dict(msg: Message) -> dict[str, Any]:
    """The message as a dict: proto field names, every field, 64-bit ints as numbers.

    (The proto3 JSON mapping writes 64-bit integers as strings; scripts
    comparing ``memory_bytes`` should not have to know that.)
    """
    d = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _ints_as_numbers(msg.DESCRIPTOR, d)  # type: ignore[arg-type]  # upb's Descriptor
    return d


def _ints_as_numbers(desc: Descriptor, d: dict[str, Any]) -> None:
    for f in desc.fields:
        if f.name not in d:
            continue
        if f.type in _INT64_TYPES:
            d[f.name] = [int(v) for v in d[f.name]] if f.is_repeated else int(d[f.name])
        elif f.message_type is not None and f.message_type.full_name != _TIMESTAMP:
            for sub in d[f.name] if f.is_repeated else [d[f.name]]:
                _ints_as_numbers(f.message_type, sub)


# ----------------------------------------------------------------- helpers
def state_name(state: agentd_pb2.AgentState.ValueType) -> str:
    """``running``, ``stopping``, ``exited``, ``killed`` or ``unknown``."""
    name = agentd_pb2.AgentState.Name(state).removeprefix("AGENT_STATE_").lower()
    return "unknown" if name == "unspecified" else name


def _when(ts: Timestamp, now: datetime) -> str:
    return fmt.format_time(ts.ToDatetime(tzinfo=now.tzinfo), now) if ts.seconds else "-"


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def resources_text(res: agentd_pb2.Resources) -> str:
    """``memory 512M, pids 256, cpus 0.5``; 'daemon defaults' when none is set."""
    parts = []
    if res.memory_bytes:
        parts.append(f"memory {fmt.format_bytes(res.memory_bytes)}")
    if res.pids_max:
        parts.append(f"pids {res.pids_max}")
    if res.cpu_millis:
        parts.append(f"cpus {fmt.format_cpus(res.cpu_millis)}")
    return ", ".join(parts) or "daemon defaults"


def _fields(rows: list[tuple[str, str]]) -> str:
    """``key: value`` lines, values aligned; a value's further lines indented under it."""
    width = max(len(k) for k, _ in rows) + 2
    indent = "\n" + " " * width
    return "\n".join(f"{k + ':':<{width}}{(v or '-').replace(chr(10), indent)}" for k, v in rows)


# ------------------------------------------------------------------ agents
def agent_text(agent: agentd_pb2.Agent, now: datetime) -> str:
    """Every field of an Agent, one per line (for ``status`` and ``run``)."""
    exit_parts = []
    if agent.HasField("exit_code"):
        exit_parts.append(f"code {agent.exit_code}")
    if agent.HasField("exit_signal"):
        exit_parts.append(f"signal {agent.exit_signal} ({_signal_name(agent.exit_signal)})")
    rows = [
        ("name", agent.name),
        ("id", agent.id),
        ("state", state_name(agent.state)),
        ("main pid", str(agent.main_pid) if agent.main_pid else "-"),
        ("pids", f"{len(agent.pids)}: {' '.join(map(str, agent.pids))}" if agent.pids else "0"),
        ("memory", fmt.format_bytes(agent.memory_bytes)),
        ("cgroups", "\n".join(agent.cgroup_paths) or "-"),
        ("user", f"{agent.user or '-'} (uid {agent.uid})"),
        ("command", shlex.join(agent.argv)),
        ("limits", resources_text(agent.resources)),
        ("started", _when(agent.started_at, now)),
        ("ended", _when(agent.ended_at, now)),
        ("exit", ", ".join(exit_parts) or "-"),
        ("end reason", agent.end_reason or "-"),
        ("lease", _lease_text(agent)),
        ("max runtime", fmt.format_duration(agent.max_runtime_ms / 1000)
         if agent.max_runtime_ms else "-"),
        ("oom kills", str(agent.oom_kills)),
        ("stdout log", agent.stdout_log or "-"),
        ("stderr log", agent.stderr_log or "-"),
        ("started by", agent.started_by or "-"),
    ]
    if agent.HasField("sandbox"):
        rows.append(("sandbox", sandbox_text(agent.sandbox)))
    rows.append(("signals", _sampled_text(agent, now)))
    text = _fields(rows)
    if agent.signals.sampled_at.seconds:
        text += "\n" + textwrap.indent(signals_text(agent.signals), "  ")
    return text


def sandbox_text(sb: agentd_pb2.Sandbox) -> str:
    """The sandbox asked for, then each restriction as the daemon read it back at launch."""
    failed = sum(1 for c in sb.checks if not c.ok)
    lines = [
        f"policy {sb.policy}: network {sb.network}, user {sb.user}, "
        f"scratch {fmt.format_bytes(sb.scratch_bytes)}",
        f"entrypoint sha256 {sb.entrypoint_sha256 or 'unknown'}",
        f"checked from outside at launch: {len(sb.checks) - failed} ok"
        + (f", {failed} FAILED" if failed else ""),
    ]
    width = max((len(c.name) for c in sb.checks), default=0)
    lines += [f"{'ok' if c.ok else 'FAILED':<6}  {c.name:<{width}}  {c.detail}"
              for c in sb.checks]
    if sb.view:
        lines.append("filesystem view (nothing else of the host):")
        lines += view_lines(sb.view)
    if sb.network == "allowlist":
        lines += egress_lines(sb)
    return "\n".join(lines)


def egress_lines(sb: agentd_pb2.Sandbox) -> list[str]:
    """The allowlist in force and the flows agentd's proxy saw last, newest last."""
    cap = fmt.format_bytes(sb.egress_byte_cap) if sb.egress_byte_cap else "none"
    if sb.cut:
        head = "allowlist: CUT (every flow closed, nothing reachable)"
    else:
        head = f"allowlist ({len(sb.allow)}): {' '.join(sb.allow) or 'empty (DNS only)'}"
    out = [f"{head}; byte cap {cap}"]
    if sb.recent_flows:
        out.append(f"recent flows ({len(sb.recent_flows)}, as agentd's proxy saw them):")
    for f in sb.recent_flows:
        where = f.name or f.addr or "?"
        if f.name and f.addr:
            where += f" ({f.addr})"
        state = "open" if f.open else f.verdict
        moved = f"{fmt.format_bytes(f.bytes_out)} out {fmt.format_bytes(f.bytes_in)} in"
        line = f"  {state:<8} {where}:{f.port} via {f.via}"
        if f.verdict in ("allowed",) and not f.open:
            line += f"  {moved}, {f.duration_s:.1f} s"
        if f.verdict in ("denied", "refused"):
            line += f"  {f.reason}"
        out.append(line)
    return out


def view_lines(view: Sequence[agentd_pb2.ViewEntry]) -> list[str]:
    """One line per entry of the view: path, ro or rw, where it comes from.

    A writable bind (a workspace: how a run leaves notes for the next) is
    marked so that the operator sees it.
    """
    width = max((len(v.path) for v in view), default=0)
    out = []
    for v in view:
        mode = "->" if v.kind == "symlink" else "rw" if v.writable else "ro"
        if v.kind == "bind":
            source = f"host {v.source}" + ("  WORKSPACE (writable host directory)"
                                           if v.writable else "")
        elif v.kind in ("mask", "hide"):
            source = f"{v.source}: masked ({v.why})"
        else:
            source = v.source
        out.append(f"  {v.path:<{width}}  {mode}  {source}")
    return out


def _sampled_text(agent: agentd_pb2.Agent, now: datetime) -> str:
    if not agent.signals.sampled_at.seconds:
        return "not sampled yet"
    when = _when(agent.signals.sampled_at, now)
    if agent.ended_at.seconds:
        return f"last sampled {when}, before it ended"
    return f"sampled {when} by the daemon, from cgroupfs and /proc"


def signals_text(s: agentd_pb2.AgentSignals) -> str:
    """What the daemon last saw the agent do, one signal per line (the ``status`` block)."""
    conns = f"{s.connections} connection" + ("" if s.connections == 1 else "s")
    return _fields(
        [
            ("uptime", fmt.format_duration(s.uptime_s)),
            ("processes started", f"{s.processes_started} ({s.processes_per_second:.1f}/s)"),
            ("recent commands", "\n".join(s.recent_commands)),
            ("cpu", f"{s.cpu_percent:.1f}% ({fmt.format_duration(s.cpu_seconds)} in all)"),
            ("memory", fmt.format_bytes(s.memory_bytes)),
            ("pids", str(s.pids)),
            ("sockets", f"{s.sockets_open} open, {conns}"),
            ("remote addresses", "\n".join(s.remote_addresses)),
            ("files written", "\n".join(s.files_written)),
            ("oom kills", str(s.oom_kills)),
            ("tripwire hits", str(s.tripwire_hits)),
            *([("egress", f"{s.egress_flows_open} flow(s) open, "
                          f"{fmt.format_bytes(s.egress_bytes)} moved, "
                          f"{s.egress_denied} denied")]
              if s.egress_bytes or s.egress_denied or s.egress_flows_open else []),
        ]
    )


def _lease_text(agent: agentd_pb2.Agent) -> str:
    if not agent.lease_ttl_ms:
        return "-"
    text = f"{fmt.format_duration(agent.lease_ttl_ms / 1000)} (renew with agentctl keepalive)"
    if agent.HasField("lease_remaining_ms"):
        left = max(0.0, agent.lease_remaining_ms / 1000)
        text = f"{fmt.format_duration(agent.lease_ttl_ms / 1000)}, {left:.1f}s left"
    return text


def _uptime(a: agentd_pb2.Agent, now: datetime) -> str:
    """How long it has run, or how long ago it ended (``ps`` and ``top``)."""
    if not a.started_at.seconds:
        return "-"
    if a.ended_at.seconds:
        ago = now - a.ended_at.ToDatetime(tzinfo=now.tzinfo)
        return f"ended {fmt.format_duration(ago.total_seconds())} ago"
    up = now - a.started_at.ToDatetime(tzinfo=now.tzinfo)
    return fmt.format_duration(up.total_seconds())


def agents_table(agents: list[agentd_pb2.Agent], now: datetime) -> str:
    """The ``ps`` table: NAME STATE PIDS MEM UPTIME USER ID."""
    rows = []
    for a in sorted(agents, key=lambda a: (a.name, a.started_at.seconds)):
        rows.append(
            [
                a.name,
                state_name(a.state),
                str(len(a.pids)),
                fmt.format_bytes(a.memory_bytes),
                _uptime(a, now),
                a.user or "-",
                a.id,
            ]
        )
    return fmt.table(["NAME", "STATE", "PIDS", "MEM", "UPTIME", "USER", "ID"], rows)


def top_table(agents: list[agentd_pb2.Agent], now: datetime) -> str:
    """The ``top`` table: NAME STATE PIDS CPU% MEM PROC/S SOCKS CONNS OOM UPTIME.

    Running agents first, busiest first; then ended ones by name. PIDS and
    MEM are read from cgroupfs when the daemon answered; the rest is the
    daemon's last sample ("-" before the first one, and once ended).
    """
    def order(a: agentd_pb2.Agent) -> tuple[bool, float, str]:
        return (bool(a.ended_at.seconds), -a.signals.cpu_percent, a.name)

    rows = []
    for a in sorted(agents, key=order):
        s = a.signals
        live = bool(s.sampled_at.seconds) and not a.ended_at.seconds
        rows.append(
            [
                a.name,
                state_name(a.state),
                str(len(a.pids)),
                f"{s.cpu_percent:.1f}" if live else "-",
                fmt.format_bytes(a.memory_bytes),
                f"{s.processes_per_second:.1f}" if live else "-",
                str(s.sockets_open) if live else "-",
                str(s.connections) if live else "-",
                str(max(s.oom_kills, a.oom_kills)),
                _uptime(a, now),
            ]
        )
    return fmt.table(
        ["NAME", "STATE", "PIDS", "CPU%", "MEM", "PROC/S", "SOCKS", "CONNS", "OOM", "UPTIME"],
        rows)


# ------------------------------------------------------------------- kills
AUDIT_PENDING = ("done, but its audit record is not on disk yet (the daemon's disk is full "
                 "or slow); agentd keeps it and writes it, in order, as soon as it can")


def kill_text(result: agentd_pb2.KillResult, verb: str) -> str:
    """What a stop or kill (*verb*) did, e.g.

    ``killed 'rogue': 3 processes, cgroup verified empty in 1.8 ms (cgroup.kill)``

    and, when processes are stuck, a table of them and what happens next.
    """
    done = {"stop": "stopped", "kill": "killed"}.get(verb, verb + "ed")
    n = result.processes_killed
    procs = f"{n} process" + ("" if n == 1 else "es")
    if result.terminated_by_sigterm:
        procs += f" ({result.terminated_by_sigterm} exited on SIGTERM)"
    method = f" ({result.method})" if result.method else ""
    took = fmt.format_ms(result.duration_ms)
    if result.already_ended:
        head = f"'{result.name}' had already ended ({state_name(result.state)}): nothing to {verb}"
        if result.verified_empty:
            return head
        head += ", but its cgroup is NOT empty"
    elif result.verified_empty:
        return f"{done} '{result.name}': {procs}, cgroup verified empty in {took}{method}"
    else:
        head = f"{done} '{result.name}': {procs}, but the cgroup is NOT empty after {took}{method}"
    rows = [[str(p.pid), p.state or "?", p.wchan or "-", p.comm or "?"] for p in result.stuck]
    stuck = fmt.table(["PID", "STATE", "WCHAN", "COMM"], rows)
    return "\n".join(
        [
            f"{head}; {len(result.stuck)} still present:",
            *("  " + line for line in stuck.split("\n")),
            "agentd keeps watching them: a process in D state dies when it leaves the kernel "
            f"(check with: agentctl status {result.name})",
        ]
    )


# -------------------------------------------------------------------- info
def info_text(info: agentd_pb2.InfoResponse, now: datetime) -> str:
    """The daemon's facts, one per line."""
    degraded = "ok"
    if info.replay_degraded_until.seconds:
        until = info.replay_degraded_until.ToDatetime(tzinfo=now.tzinfo)
        if until > now:
            degraded = (
                f"rebuilding until {fmt.format_time(until, now)}: "
                "only stop, kill and estop are accepted until then"
            )
    return _fields(
        [
            ("host id (audience)", info.host_id),
            ("version", info.version),
            ("cgroup mode", info.cgroup_mode),
            ("kill method", info.kill_method),
            ("max command lifetime", fmt.format_duration(info.max_command_lifetime_s)),
            ("allowed clock skew", fmt.format_duration(info.clock_skew_s)),
            ("replay cache", degraded),
            ("emergency stop", _latch_text(info, now)),
            ("reset needs", f"{info.reset_signatures_required} distinct principal(s)"),
            ("leases", ("required" if info.lease_required else "optional")
             + (f", default {fmt.format_duration(info.default_lease_ms / 1000)}"
                if info.default_lease_ms else "")),
            ("guardian", info.guardian or "-"),
            ("audit log", info.audit_log),
            ("audit records", str(info.audit_records)),
            ("audit head", info.audit_head),
        ]
    )


def _latch_text(info: agentd_pb2.InfoResponse, now: datetime) -> str:
    if not info.estop_latched:
        return "not latched"
    since = fmt.format_time(info.latched_at.ToDatetime(tzinfo=now.tzinfo), now)
    return f"LATCHED since {since}: {info.latch_reason}; runs refused until 'agentctl reset'"


# ------------------------------------------------------------------ estop
def estop_text(result: agentd_pb2.EstopResult) -> str:
    """What an emergency stop did, one line, then any agent not verified empty."""
    head = (f"EMERGENCY STOP: killed {result.agents_killed} agent(s), "
            f"{result.processes_killed} process(es)")
    if result.all_verified_empty:
        head += f", every cgroup verified empty in {fmt.format_ms(result.duration_ms)}"
    else:
        head += ", but some cgroups are NOT empty"
    lines = [head, "latched: every run is refused until 'agentctl reset'"]
    for a in result.agents:
        if not a.verified_empty:
            lines.append(kill_text(a, "kill"))
    return "\n".join(lines)
