"""Idle scale: what a daemon costs while N sandboxed agents sleep, and whether it still acts.

For N idle agents (each its bwrap sandbox and one /bin/sleep; defaults: 10,
100 and 1000) under one dev daemon with default sampling (every second),
measures:

* the daemon's CPU, from /proc/PID/stat utime+stime over a quiet window
  (no RPCs meanwhile): percent of one core — the daemon's own CPU time,
  so other load on the host does not count (it only stretches wall time);
* its RSS (VmRSS in /proc/PID/status) at the end of the window;
* how old every agent's signals are: a few ListAgents spread over two
  sampling periods, the age of each agent's sampled_at (max and median);
* signal tripwire reaction: a probe agent, sampled idle first, then starts
  60 processes (rule fork-burst, processes_per_second > 20) or opens 8
  sockets in its known process (rule socket-hoard, sockets_open > 4); the
  delay from the probe's own CLOCK_MONOTONIC before the act to the daemon's
  detection (the tripwire record's detected_mono; the clock is shared);
* `agentctl kill` of one idle agent: wall time of the whole command as an
  operator runs it (interpreter start and imports included, bytecode cached
  as an installed package has it).

Prints a table, writes results/idle_scale.json. Never asserts a time. Needs
root. 1000 sandboxed agents take a minute or so to launch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agentd.v1 import agentd_pb2
from common import add_smoke_flag, cell, dev_daemon, need_root, print_head, summary, write_json
from cryptography.hazmat.primitives import serialization

from tests.harness import AGENT_PYTHON, SANDBOX_PROCS, Daemon, pids_in, wait_for

SIZES = [10, 100, 1000]
WINDOW_S = 30.0
PROBES = 3  # repetitions of each tripwire probe
CLI_KILLS = 5
_TICK = os.sysconf("SC_CLK_TCK")

RULES = """\
[[rule]]
name = "fork-burst"
kind = "signal"
metric = "processes_per_second"
threshold = 20
action = "kill"

[[rule]]
name = "socket-hoard"
kind = "signal"
metric = "sockets_open"
threshold = 4
action = "kill"
"""

# Sampled idle for a while, then acts; prints its CLOCK_MONOTONIC just before.
_PROBE = """\
import socket, subprocess, sys, time
time.sleep(float(sys.argv[2]))
t = time.clock_gettime(time.CLOCK_MONOTONIC)
if sys.argv[1] == "forks":
    # 60, not 21: a burst split across two samples still shows more than 20 per second in one.
    kids = [subprocess.Popen(["/bin/sleep", "1000"]) for _ in range(60)]
else:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
print(repr(t), flush=True)
time.sleep(1000)
"""
_PROBE_RULE = {"forks": "fork-burst", "sockets": "socket-hoard"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), proc(5) fields 14 and 15."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def launch(d: Daemon, n: int) -> list[agentd_pb2.Agent]:
    """n idle agents, launched four at a time; returns once each has its one sleep."""
    def one(i: int) -> agentd_pb2.Agent:
        return d.run(f"idle-{i}", ["/bin/sleep", "100000"], reason="benchmark")

    with ThreadPoolExecutor(4) as pool:
        agents = list(pool.map(one, range(n)))
    for a in agents:
        cg = a.cgroup_paths[0]
        if not wait_for(lambda cg=cg: len(pids_in(cg)) >= 1 + SANDBOX_PROCS, 60):
            raise RuntimeError(f"{a.name} never started its sleep")
    return agents


def signal_ages(d: Daemon, reads: int, period_s: float) -> tuple[list[float], int]:
    """Ages (s) of every agent's signals over `reads` ListAgents; and how many were unsampled."""
    ages: list[float] = []
    unsampled = 0
    for i in range(reads):
        if i:
            time.sleep(period_s)
        listed = d.stub.ListAgents(agentd_pb2.ListAgentsRequest(), timeout=60).agents
        now = time.time()
        for a in listed:
            if a.state != agentd_pb2.AGENT_STATE_RUNNING:
                continue
            at = a.signals.sampled_at.seconds + a.signals.sampled_at.nanos / 1e9
            if at == 0:
                unsampled += 1
            else:
                ages.append(max(0.0, now - at))
    return ages, unsampled


def probe(d: Daemon, kind: str, i: int) -> float:
    """Seconds from the probe's act to the daemon's detection; raises if it is never acted on."""
    a = d.run(f"probe-{kind}-{i}", [AGENT_PYTHON, "-S", "-c", _PROBE, kind, "2.5"],
              reason="benchmark")
    out = Path(a.stdout_log)
    if not wait_for(lambda: out.read_text().endswith("\n"), 30, interval=0.05):
        raise RuntimeError(f"probe {a.name} never acted: {Path(a.stderr_log).read_text()}")
    acted = float(out.read_text().split()[0])
    rule = _PROBE_RULE[kind]

    def record() -> dict[str, Any] | None:
        return next((r for r in d.audit_records() if r["event"] == "tripwire"
                     and r.get("agent_id") == a.id and r.get("rule") == rule), None)

    if not wait_for(lambda: record() is not None, 30, interval=0.1):
        raise RuntimeError(f"{rule} never fired on {a.name}: {d.get(a.name).signals}")
    rec = record()
    assert rec is not None
    if rec["outcome"] != "killed":
        raise RuntimeError(f"{rule} on {a.name}: {rec['outcome']}")
    return float(rec["detected_mono"]) - acted


def cli_kills(d: Daemon, names: list[str]) -> list[float]:
    """Wall ms of `python -m agentctl kill NAME`, interpreter start included."""
    key = d.dir.parent / "oncall.key"
    key.write_bytes(d.keys.oncall.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    key.chmod(0o600)
    # As installed: with bytecode caches (a package install writes them; a
    # PYTHONDONTWRITEBYTECODE=1 environment would have every run compile
    # agentctl and the stubs again, 20 ms and more). One untimed run first
    # writes them.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENTD_", "AGENTCTL_")) and k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "agentctl", "--help"], capture_output=True,
                   timeout=60, env=env, check=True)
    out = []
    for name in names:
        argv = [sys.executable, "-m", "agentctl", "--socket", str(d.socket), "--key", str(key),
                "kill", name]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        out.append((time.perf_counter() - t0) * 1e3)
        if done.returncode != 0:
            raise RuntimeError(f"agentctl kill {name}: {done.stderr}")
    return out


def bench(n: int, window_s: float, probes: int, kills: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-idle-"))
    rules = root / "rules.toml"
    rules.write_text(RULES)
    try:
        with dev_daemon(config=f'rules_file = "{rules}"\n') as d:
            t0 = time.monotonic()
            agents = launch(d, n)
            launch_s = time.monotonic() - t0
            # Every agent sampled a few times before the window opens.
            time.sleep(3.0)
            c0, w0 = cpu_seconds(d.pid), time.monotonic()
            time.sleep(window_s)
            c1, w1 = cpu_seconds(d.pid), time.monotonic()
            rss = rss_mb(d.pid)
            ages, unsampled = signal_ages(d, 5, 0.45)
            reactions = {k: [probe(d, k, i) for i in range(probes)] for k in _PROBE_RULE}
            wall = cli_kills(d, [a.name for a in agents[:kills]])
        return {
            "agents": n, "processes": n * (1 + SANDBOX_PROCS), "launch_s": launch_s,
            "window_s": w1 - w0, "daemon_cpu_percent": (c1 - c0) / (w1 - w0) * 100,
            "daemon_rss_mb": rss,
            "signal_age_s": {"median": statistics.median(ages) if ages else float("nan"),
                             "max": max(ages, default=float("nan")), "n": len(ages),
                             "unsampled": unsampled},
            "reaction_s": {k: summary(v) for k, v in reactions.items()},
            "cli_kill_ms": summary(wall),
        }
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    ap.add_argument("--window", type=float, default=WINDOW_S, help="CPU window, seconds")
    ap.add_argument("--out", type=Path)
    add_smoke_flag(ap)
    a = ap.parse_args()
    probes, kills = PROBES, CLI_KILLS
    if a.smoke:
        a.sizes, a.window, probes, kills = [min(a.sizes)], 3.0, 1, 1
    need_root("idle_scale")
    rows = [bench(n, a.window, probes, kills) for n in a.sizes]
    print_head(f"{'agents':>6} {'procs':>5} | {'cpu % core':>10} | {'RSS MB':>6} | "
               f"{'signal age med/max':>18} | {'fork-burst react':>16} | "
               f"{'socket-hoard react':>18} | {'agentctl kill ms':>16}")
    for r in rows:
        age = r["signal_age_s"]
        react = r["reaction_s"]
        print(f"{r['agents']:>6} {r['processes']:>5} | {r['daemon_cpu_percent']:>10.2f} | "
              f"{r['daemon_rss_mb']:>6.1f} | {age['median']:>7.2f} / {age['max']:>5.2f} s | "
              f"{react['forks']['median']:>5.2f} / {react['forks']['max']:>5.2f} s | "
              f"{react['sockets']['median']:>7.2f} / {react['sockets']['max']:>5.2f} s | "
              f"{cell(r, 'cli_kill_ms', 'max', 6, 0):>16}")
    print(f"\ncpu: daemon's utime+stime over a quiet window of {a.window:g} s; reaction: "
          "median / max from the probe's act to detection; agentctl kill: median / max wall")
    unsampled = sum(r["signal_age_s"]["unsampled"] for r in rows)
    if unsampled:
        print(f"agents never sampled at the time of reading: {unsampled}")
    print(f"wrote {write_json('idle_scale', rows, a.out, smoke=a.smoke)}")


if __name__ == "__main__":
    main()
