"""Stop under load: a signed kill of a 10-process agent, quiet and beside what a client can hold.

Each row kills agents (10 processes each) with the real `agentctl kill`
(AGENTD_SOCKET and AGENTCTL_KEY set, as an operator would) and reports the
CLI's wall time and the daemon's own acceptance-to-empty time
(KillResult.duration_ms), quiet and beside one load at a time (issue 10):

* stalled: calls whose request never arrives (opened afresh for each kill:
  the server ends them after its 5 s receive deadline);
* idle: raw connections that sent the HTTP/2 preface and SETTINGS and then
  nothing; the server caps connections (daemon.api.server.max_connections),
  and the row says how many it took, closed or left unanswered;
* flood: keyless envelopes (8 garbage signatures) from a few processes, as
  fast as they go; the audit log's growth is measured after the burst of
  individual records, over one summary window, and extrapolated to an hour;
* stops: signed stops of SIGTERM-ignoring agents in 300 s grace periods;
* followers: Logs(follow=True) of an agent with megabytes of output, whose
  client never reads.

Survivors are counted, the load's own agents included. Prints a table and
the targets (met or not), writes results/stop_under_load.json. Never asserts
a time. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from agentd.v1 import agentd_pb2, agentd_pb2_grpc
from common import (
    add_smoke_flag,
    dev_daemon,
    need_root,
    print_head,
    summary,
    tree_script,
    wait_count,
    write_json,
)
from cryptography.hazmat.primitives import serialization

from daemon.commands.rejections import BURST
from tests.harness import REPO, SANDBOX_PROCS, Daemon, pids_in
from tests.load import FloodProcesses, StalledCalls, channel

PROCS = 10
FULL = {"stalled": 1000, "idle": 1000, "flood": 3, "stops": 200, "followers": 100}
SMOKE = {"stalled": 100, "idle": 50, "flood": 1, "stops": 5, "followers": 5}
# Long enough for one summary window (daemon.commands.rejections, 60 s) to
# close inside the measurement; a smoke flood only checks that it runs.
FLOOD_S, SMOKE_FLOOD_S = 75.0, 4.0
FLOOD_MAX_PER_PROCESS = 1_000_000
STUBBORN = ["/bin/sh", "-c", "trap '' TERM; exec sleep 1000"]  # SIG_IGN survives execve(2)
LOG_BYTES = 16 * 1024 * 1024
TARGETS = ("CLI wall median <= 2x quiet; daemon-reported median <= quiet + 5 ms; "
           "every kill served; zero survivors; audit growth <= 1 MiB per hour of flood")
MiB = 1024 * 1024


# ------------------------------------------------------------------ the kill
def _keyfile(d: Daemon) -> Path:
    path = d.dir.parent / "oncall.key"
    path.write_bytes(d.keys.oncall.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _launch(d: Daemon, name: str) -> Path:
    agent = d.run(name, ["/bin/sh", "-c", tree_script(PROCS)], reason="benchmark")
    cg = Path(agent.cgroup_paths[0])
    wait_count(cg / "cgroup.procs", PROCS + SANDBOX_PROCS)
    return cg


def _cli_kill(d: Daemon, key: Path, name: str) -> dict[str, Any]:
    """`agentctl --json kill NAME`: wall ms, the daemon's ms, or the error it printed."""
    env = {**os.environ, "AGENTD_SOCKET": str(d.socket), "AGENTCTL_KEY": str(key)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "agentctl", "--json", "kill", name,
                          "--reason", "benchmark"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    wall = (time.perf_counter() - t0) * 1e3
    if out.returncode != 0:
        return {"wall_ms": wall, "error": (out.stderr.strip() or f"exit {out.returncode}")[:300]}
    return {"wall_ms": wall, "daemon_ms": float(json.loads(out.stdout)["duration_ms"])}


def _one_kill(d: Daemon, key: Path, name: str, during: Callable[[], None] | None = None,
              ) -> dict[str, Any]:
    cg = _launch(d, name)
    if during is not None:
        during()
    r = _cli_kill(d, key, name)
    if "error" in r:
        # Not left running: killed on the benchmark's own (older) connection.
        d.kill(name)
    r["survivors"] = len(pids_in(cg))
    return r


# ------------------------------------------------------------------- loads
@contextmanager
def _idle_connections(sock: Path, n: int) -> Iterator[dict[str, int]]:
    """n connections that did the HTTP/2 preface and SETTINGS, then sit idle."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    settings_ack = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
    conns: list[socket.socket] = []
    counts = {"asked": n, "answered": 0, "closed": 0, "unanswered": 0, "refused": 0}
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(sock))
                s.sendall(preface)
            except OSError:
                counts["refused"] += 1
                s.close()
                continue
            conns.append(s)
        waiting = set(conns)
        deadline = time.monotonic() + 10
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(waiting)[:1000], [], [], 0.2)
            for s in ready:
                waiting.discard(s)
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    counts["answered"] += 1
                    s.sendall(settings_ack)
                else:
                    counts["closed"] += 1
        counts["unanswered"] = len(waiting)
        yield counts
    finally:
        for s in conns:
            s.close()


@dataclass
class _Left:
    survivors: int = 0


@contextmanager
def _stops_in_grace(d: Daemon, n: int) -> Iterator[_Left]:
    """n signed stops of SIGTERM-ignoring agents, each in a 300 s grace period.

    Spread over connections of their own: a connection carries at most 100
    streams (server.py), and calls past that wait in the client, so 200
    stops on the harness's channel would hold its every later call. On the
    way out the agents are killed (a kill ends a pending stop) and every
    stop must complete; what yielded then counts the agents' survivors.
    """
    left = _Left()
    names = [f"stubborn-{i}" for i in range(n)]
    cgroups = [Path(d.run(name, STUBBORN, reason="benchmark").cgroup_paths[0])
               for name in names]
    channels = [channel(d.socket, 3000 + i) for i in range(max(1, -(-n // 50)))]
    stubs = [agentd_pb2_grpc.AgentdStub(ch) for ch in channels]
    futures: list[grpc.Future] = []
    try:
        for i, name in enumerate(names):
            cmd = d.command()
            cmd.stop.name = name
            cmd.stop.grace_ms = 300_000
            futures.append(stubs[i % len(stubs)].Stop.future(d.sign(cmd, d.keys.oncall),
                                                              timeout=600))
        deadline = time.monotonic() + 120
        while any(a.state != agentd_pb2.AGENT_STATE_STOPPING
                  for a in d.stub.ListAgents(agentd_pb2.ListAgentsRequest(), timeout=30).agents
                  if a.name in names):
            if time.monotonic() > deadline:
                raise RuntimeError("the stops did not all begin")
            time.sleep(0.2)
        yield left
    finally:
        kills = []
        for i, name in enumerate(names):
            cmd = d.command()
            cmd.kill.name = name
            kills.append(stubs[i % len(stubs)].Kill.future(d.sign(cmd, d.keys.oncall),
                                                            timeout=120))
        for f in kills + futures:
            f.result(timeout=120)
        for ch in channels:
            ch.close()
        left.survivors = sum(len(pids_in(cg)) for cg in cgroups)


@contextmanager
def _followers(d: Daemon, n: int) -> Iterator[str]:
    """n Logs followers of a chatty agent, never read; yields the agent's name."""
    name = "chatty"
    agent = d.run(name, ["/bin/sh", "-c", f"yes agentd-bench-log-line | head -c {LOG_BYTES}; "
                         "exec sleep 1000"], reason="benchmark")
    deadline = time.monotonic() + 60
    while Path(agent.stdout_log).stat().st_size < LOG_BYTES:
        if time.monotonic() > deadline:
            raise RuntimeError("the chatty agent did not write its output")
        time.sleep(0.05)
    nchan = max(1, -(-n // 25))
    channels = [channel(d.socket, 2000 + i) for i in range(nchan)]
    calls = []
    try:
        for i in range(n):
            stub = agentd_pb2_grpc.AgentdStub(channels[i % nchan])
            calls.append(stub.Logs(agentd_pb2.LogsRequest(name=name, follow=True,
                                                          tail_bytes=LOG_BYTES)))
        yield name
    finally:
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
        d.kill(name)


def _is_refusal(r: dict[str, Any]) -> bool:
    return (r["event"] == "commands_rejected_summary"
            or (r["event"] == "command" and r.get("decision") == "rejected"))


def _audit_rejected(d: Daemon) -> int:
    return sum(1 for r in d.audit_records() if _is_refusal(r) and "count" not in r)


def _refusal_bytes(d: Daemon, offset: int) -> int:
    """Bytes of refusal records (one by one or summaries) in the audit log past offset.

    The kills measured meanwhile, and their agents' runs, write records too;
    they are not the flood's.
    """
    with open(d.audit_log, "rb") as f:
        f.seek(offset)
        return sum(len(line) for line in f if _is_refusal(json.loads(line)))


# -------------------------------------------------------------------- rows
def _row(load: str, detail: dict[str, Any], kills: list[dict[str, Any]],
         load_survivors: int = 0, audit: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [k for k in kills if "error" not in k]
    return {
        "load": load, "detail": detail, "reps": len(kills), "failed": len(kills) - len(ok),
        "errors": sorted({k["error"] for k in kills if "error" in k}),
        "cli_wall_ms": summary([k["wall_ms"] for k in ok]),
        "daemon_ms": summary([k["daemon_ms"] for k in ok]),
        "survivors": sum(k["survivors"] for k in kills) + load_survivors,
        "audit": audit,
    }


def run_rows(d: Daemon, size: dict[str, int], reps: int, flood_s: float) -> list[dict[str, Any]]:
    key = _keyfile(d)
    names = iter(range(1_000_000))

    def kills(during: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        return [_one_kill(d, key, f"bench-{next(names)}", during) for _ in range(reps)]

    rows = [_row("quiet", {}, kills())]

    held, results = [], []
    for _ in range(reps):
        # Opened afresh for each kill, after its agent is up: the server ends
        # them RECEIVE_DEADLINE_S after they arrive.
        st: list[StalledCalls] = []
        try:
            results.append(_one_kill(d, key, f"bench-{next(names)}", lambda st=st: st.append(
                StalledCalls(d.socket, size["stalled"]))))
            held.append(st[0].pending())
        finally:
            for s in st:
                s.close()
    rows.append(_row(f"{size['stalled']} stalled calls", {"held_at_kill_end": min(held)},
                     results))

    with _idle_connections(d.socket, size["idle"]) as counts:
        rows.append(_row(f"{size['idle']} idle connections", dict(counts), kills()))

    before_rejected, before_size = _audit_rejected(d), d.audit_log.stat().st_size
    flood = FloodProcesses(d.socket, size["flood"], flood_s, FLOOD_MAX_PER_PROCESS)
    try:
        deadline = time.monotonic() + 60
        while _audit_rejected(d) < before_rejected + BURST and time.monotonic() < deadline:
            time.sleep(0.05)
        size_a, t_a = d.audit_log.stat().st_size, time.monotonic()
        flood_kills = kills()
        sent = flood.results(timeout=flood_s + 120)
        t_b = time.monotonic()
    finally:
        flood.close()
    total = sum(r["sent"] for r in sent)
    codes: dict[str, int] = {}
    for r in sent:
        for c, k in r["codes"].items():
            codes[c] = codes.get(c, 0) + k
    grown = _refusal_bytes(d, size_a)
    audit = {"burst_bytes": _refusal_bytes(d, before_size) - grown,
             "bytes_after_burst": grown, "seconds": round(t_b - t_a, 2),
             "bytes_per_hour": grown / (t_b - t_a) * 3600}
    rows.append(_row(f"keyless flood ({size['flood']} procs)",
                     {"sent": total, "per_s": round(total / max(r["seconds"] for r in sent)),
                      "codes": codes}, flood_kills, audit=audit))

    with _stops_in_grace(d, size["stops"]) as left:
        stop_kills = kills()
    rows.append(_row(f"{size['stops']} stops in grace", {}, stop_kills,
                     load_survivors=left.survivors))

    with _followers(d, size["followers"]):
        rows.append(_row(f"{size['followers']} log followers", {}, kills()))
    return rows


def judge(rows: list[dict[str, Any]]) -> None:
    quiet = rows[0]
    for r in rows:
        met = {
            "cli_wall": r["cli_wall_ms"]["median"] <= 2 * quiet["cli_wall_ms"]["median"],
            "daemon": r["daemon_ms"]["median"] <= quiet["daemon_ms"]["median"] + 5.0,
            "served": r["failed"] == 0,
            "survivors": r["survivors"] == 0,
        }
        if r["audit"] is not None:
            met["audit"] = r["audit"]["bytes_per_hour"] <= MiB
        r["targets_met"] = met


def print_table(rows: list[dict[str, Any]]) -> None:
    print_head(f"{'load':<26} {'reps':>4} | {'CLI wall ms med/p99':>19} | "
               f"{'daemon ms med/p99':>17} | {'surv':>4} | {'audit/h':>9} | targets")
    for r in rows:
        w, dm = r["cli_wall_ms"], r["daemon_ms"]
        audit = f"{r['audit']['bytes_per_hour'] / 1024:7.0f}Ki" if r["audit"] else "-"
        met = " ".join(f"{k}:{'ok' if v else 'MISSED'}" for k, v in r["targets_met"].items())
        print(f"{r['load']:<26} {r['reps']:>4} | {w['median']:8.1f} / {w['p99']:8.1f} | "
              f"{dm['median']:7.2f} / {dm['p99']:7.2f} | {r['survivors']:>4} | {audit:>9} | "
              f"{met}")
    for r in rows:
        extra = {k: v for k, v in r["detail"].items()}
        if r["errors"]:
            extra["errors"] = r["errors"]
        if r["audit"]:
            extra["audit"] = r["audit"]
        if extra:
            print(f"  {r['load']}: {json.dumps(extra)}")
    print(f"\ntargets: {TARGETS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="kills per row")
    ap.add_argument("--out", type=Path, help="JSON output [default: results/stop_under_load.json]")
    add_smoke_flag(ap)
    a = ap.parse_args()
    need_root("stop_under_load")
    size, reps, flood_s = (SMOKE, 1, SMOKE_FLOOD_S) if a.smoke else (FULL, a.reps, FLOOD_S)
    # A thousand connections, and the threads' descriptors, exceed a 1024 soft limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with dev_daemon() as d:
        rows = run_rows(d, size, reps, flood_s)
    judge(rows)
    print_table(rows)
    print(f"\nwrote {write_json('stop_under_load', rows, a.out, smoke=a.smoke)}")


if __name__ == "__main__":
    main()
