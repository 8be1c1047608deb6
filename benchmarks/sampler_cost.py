"""Sampler cost: one sweep of the daemon's kernel-signal sampler over N running agents.

Each agent is a real Python process in its own agent cgroup holding what the
sampler has to look at: one TCP connection to a loopback listener this
benchmark runs, one file open for writing outside the scratch paths, and
children (/bin/sleep). The sweep is daemon.monitor.sampler.Sampler.sweep,
the exact code the daemon's "agentd-sampler" thread runs every period:
cgroup.procs, cpu.stat, memory and OOM counters, /proc/PID/{exe,fd,fdinfo},
/proc/PID/net/* and the command lines of new processes.

Two sweeps are timed: the daemon's as it runs on these agents, which sleep
once set up (so after the first sweep each costs one cpu.stat read: the
quiet path, see daemon/monitor/sampler.py), and a full sweep (refresh_s=0),
what every sweep costs when every agent has run something since the last:
the worst case, and what the table showed before the quiet path.

Prints a table, writes results/sampler_cost.json. Never asserts a time. Needs root.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_smoke_flag, cell, need_root, print_head, summary, write_json

from tests.harness import BENCH_PREFIX
from tests.scratch_agents import ScratchAgents

# (agents, children per agent)
CASES = [(10, 2), (100, 2), (100, 9)]
SWEEPS = 30

_AGENT = """\
import socket, subprocess, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = open(sys.argv[2], "w")
kids = [subprocess.Popen(["/bin/sleep", "1000"]) for _ in range(int(sys.argv[3]))]
print("ready", flush=True)
time.sleep(1000)
"""


def bench(n: int, children: int, sweeps: int, port: int, out: Path) -> dict[str, Any]:
    scratch = ScratchAgents(prefix=BENCH_PREFIX)
    try:
        agents = [scratch.spawn([sys.executable, "-c", _AGENT, str(port), str(out / f"f{i}"),
                                 str(children)], name=f"b{i}") for i in range(n)]
        deadline = time.monotonic() + 120
        while sum(len(a.cgroup.pids()) for a in agents) < n * (children + 1):
            if time.monotonic() > deadline:
                raise RuntimeError("agents did not start in time")
            time.sleep(0.05)
        sampler = scratch.sampler()
        t0 = time.perf_counter()
        sampler.sweep()  # the first sweep reads every command line
        first = (time.perf_counter() - t0) * 1e3
        times = []
        for _ in range(sweeps):
            t0 = time.perf_counter()
            sampler.sweep()
            times.append((time.perf_counter() - t0) * 1e3)
        full = scratch.sampler()
        full.refresh_s = 0.0
        full.sweep()
        full_times = []
        for _ in range(sweeps):
            t0 = time.perf_counter()
            full.sweep()
            full_times.append((time.perf_counter() - t0) * 1e3)
        seen = sum(a.signals.connections for a in agents)
        written = sum(len(a.signals.files_written) for a in agents)
        return {"agents": n, "processes": n * (children + 1), "first_sweep_ms": first,
                "sweep_ms": summary(times), "full_sweep_ms": summary(full_times),
                "connections_seen": seen, "files_seen": written}
    finally:
        scratch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweeps", type=int, default=SWEEPS)
    ap.add_argument("--out", type=Path)
    add_smoke_flag(ap)
    a = ap.parse_args()
    cases = CASES[:1] if a.smoke else CASES
    if a.smoke:
        a.sweeps = 1
    need_root("sampler_cost")
    outside = Path(tempfile.mkdtemp(prefix="agentd-bench-", dir="/run"))
    rows = []
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            port = listener.getsockname()[1]
            for n, children in cases:
                rows.append(bench(n, children, a.sweeps, port, outside))
    finally:
        shutil.rmtree(outside, ignore_errors=True)
    head = (f"{'agents':>6} {'procs':>6} | {'first sweep':>11} | {'sweep median / p99':>19} | "
            f"{'per agent':>9} | {'full sweep med / p99':>20} | {'per agent':>9} | "
            "seen: conns, files")
    print_head(head)
    for r in rows:
        per = r["sweep_ms"]["median"] / r["agents"] * 1e3
        per_full = r["full_sweep_ms"]["median"] / r["agents"] * 1e3
        print(f"{r['agents']:>6} {r['processes']:>6} | {r['first_sweep_ms']:>8.1f} ms | "
              f"{cell(r, 'sweep_ms', 'p99', 6, 1):>16} ms | {per:>6.0f} us | "
              f"{cell(r, 'full_sweep_ms', 'p99', 6, 1):>17} ms | {per_full:>6.0f} us | "
              f"{r['connections_seen']}, {r['files_seen']}")
    print("\nsweep = Sampler.sweep() over every agent, as the daemon runs it each period (these "
          "agents sleep: quiet samples);\nfull sweep = every agent sampled in full (refresh_s=0), "
          "as when every agent ran something since the last sweep")
    print(f"wrote {write_json('sampler_cost', rows, a.out, smoke=a.smoke)}")


if __name__ == "__main__":
    main()
