"""Emergency stop: every agent on the host killed and verified empty, beside raw cgroup.kill.

For 10, 100 and 1000 agents of 10 processes each: a signed Estop RPC (the
client's wall time and the daemon's own acceptance-to-all-empty time), and a
raw cgroup.kill written to the same number of identical cgroups followed by
polling until every one is empty (the physical limit). Survivors are counted.
After each estop a signed reset clears the latch (it restarts nothing).

Prints a table, writes results/estop.json. Never asserts a time. Needs root.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import (
    Scratch,
    add_smoke_flag,
    cell,
    dev_daemon,
    need_root,
    print_head,
    spin_until_empty,
    summary,
    tree_script,
    wait_count,
    write_json,
    write_kill,
)

from tests.harness import SANDBOX_PROCS, Daemon

SIZES = [10, 100, 1000]
PER_AGENT = 10


def bench_agentd(d: Daemon, n: int, rep: int) -> tuple[float, float, int, int]:
    groups = []
    for i in range(n):
        agent = d.run(f"e{rep}-{n}-{i}", ["/bin/sh", "-c", tree_script(PER_AGENT, 0)],
                      pids=PER_AGENT + 16)
        groups.append(Path(agent.cgroup_paths[0]))
    for cg in groups:
        # The sandbox's bwrap and its init share the cgroup with the tree.
        wait_count(cg / "cgroup.procs", PER_AGENT + SANDBOX_PROCS)
    env = d.signed(lambda c: c.estop.SetInParent(), d.keys.oncall)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    result = d.stub.Estop(env, timeout=300)
    wall = (time.perf_counter() - t0) * 1e3
    survivors = sum(len((cg / "cgroup.procs").read_text().split()) for cg in groups
                    if cg.exists())
    d.stub.Reset(d.signed(lambda c: c.reset.SetInParent(), d.keys.admin),  # type: ignore[attr-defined]
                 timeout=30)
    return wall, result.duration_ms, survivors, result.processes_killed


def bench_raw(scratch: Scratch, n: int) -> tuple[float, int]:
    groups = [scratch.spawn(PER_AGENT, escaped_every=0, wait=False)[0] for _ in range(n)]
    for cg in groups:
        wait_count(cg / "cgroup.procs", PER_AGENT)
    t0 = time.perf_counter()
    for cg in groups:
        write_kill(cg)
    spin_until_empty(groups)
    ms = (time.perf_counter() - t0) * 1e3
    survivors = sum(len((cg / "cgroup.procs").read_text().split()) for cg in groups)
    scratch.cleanup()
    return ms, survivors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    ap.add_argument("--reps", type=int, default=0, help="repetitions [default: 3, 1 for 1000]")
    ap.add_argument("--out", type=Path)
    add_smoke_flag(ap)
    a = ap.parse_args()
    if a.smoke:
        a.sizes, a.reps = [min(a.sizes)], 1
    need_root("estop")
    rows: list[dict[str, Any]] = []
    with dev_daemon(extra=["--guardian-timeout", "30"]) as d, Scratch() as scratch:
        for n in a.sizes:
            reps = a.reps or (1 if n >= 1000 else 3)
            wall, dm, raw, surv, killed = [], [], [], 0, []
            for rep in range(reps):
                w, m, s, k = bench_agentd(d, n, rep)
                wall.append(w)
                dm.append(m)
                surv += s
                killed.append(k)
                r, s2 = bench_raw(scratch, n)
                raw.append(r)
                surv += s2
            rows.append({"agents": n, "processes_per_agent": PER_AGENT, "reps": reps,
                         "estop_client_ms": summary(wall), "estop_daemon_ms": summary(dm),
                         "raw_cgroup_kill_ms": summary(raw), "survivors": surv,
                         "processes_killed_reported": killed})
    head = (f"{'agents':>6} {'procs':>6} {'reps':>4} | {'estop client':>16} | "
            f"{'estop daemon':>16} | {'raw cgroup.kill':>16} | survivors")
    print_head(head)
    for r in rows:
        cells = [cell(r, k, "max", 6, 1)
                 for k in ("estop_client_ms", "estop_daemon_ms", "raw_cgroup_kill_ms")]
        print(f"{r['agents']:>6} {r['agents'] * PER_AGENT:>6} {r['reps']:>4} | "
              + " | ".join(f"{c:>16}" for c in cells) + f" | {r['survivors']}")
    print("\ncells: median / max in ms, command (or first write) to every cgroup verified empty")
    print(f"wrote {write_json('estop', rows, a.out, smoke=a.smoke)}")


if __name__ == "__main__":
    main()
