"""Emergency stop: every agent on the host killed and verified empty, beside raw cgroup.kill.

For 10, 100 and 1000 agents of 10 processes each: a signed Estop RPC (the
client's wall time, the daemon's own acceptance-to-all-empty time and its
acceptance-to-first-kill time, from the audit record), and a raw
cgroup.kill written by hand to the same number of cgroups holding the same
trees (the agents' processes in bwrap with agentd's flags), followed by
polling until every one is empty (the physical limit); and the same for bare
trees of 10 processes, no sandbox. Survivors are counted.
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


def bench_agentd(d: Daemon, n: int, rep: int) -> tuple[float, float, int, int, float]:
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
    first = _first_kill_ms(d)
    d.stub.Reset(d.signed(lambda c: c.reset.SetInParent(), d.keys.admin),  # type: ignore[attr-defined]
                 timeout=30)
    return wall, result.duration_ms, survivors, result.processes_killed, first


def _first_kill_ms(d: Daemon, timeout: float = 10.0) -> float:
    """Acceptance to the first cgroup.kill written, from the newest estop result record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in d.audit_records()
                 if r["event"] == "result" and r.get("action") == "estop"]
        if found:
            return float(found[-1]["first_kill_ms"])  # type: ignore[arg-type]
        time.sleep(0.05)
    raise RuntimeError("no estop result record in the audit log")


def bench_raw(scratch: Scratch, n: int, *, sandboxed: bool) -> tuple[float, int]:
    """cgroup.kill by hand to n trees like the agents' (sandboxed) or of bare processes."""
    if sandboxed:
        groups = [scratch.spawn_sandboxed(PER_AGENT) for _ in range(n)]
        want = PER_AGENT + SANDBOX_PROCS
    else:
        groups = [scratch.spawn(PER_AGENT, escaped_every=0, wait=False)[0] for _ in range(n)]
        want = PER_AGENT
    for cg in groups:
        wait_count(cg / "cgroup.procs", want)
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
            wall, dm, first, raw, bare, surv, killed = [], [], [], [], [], 0, []
            for rep in range(reps):
                w, m, s, k, f = bench_agentd(d, n, rep)
                wall.append(w)
                dm.append(m)
                first.append(f)
                surv += s
                killed.append(k)
                for sandboxed, into in ((True, raw), (False, bare)):
                    r, s2 = bench_raw(scratch, n, sandboxed=sandboxed)
                    into.append(r)
                    surv += s2
            rows.append({"agents": n, "processes_per_agent": PER_AGENT, "reps": reps,
                         "estop_client_ms": summary(wall), "estop_daemon_ms": summary(dm),
                         "estop_first_kill_ms": summary(first),
                         "raw_cgroup_kill_ms": summary(raw),
                         "raw_bare_cgroup_kill_ms": summary(bare), "survivors": surv,
                         "processes_killed_reported": killed})
    head = (f"{'agents':>6} {'procs':>6} {'reps':>4} | {'estop client':>16} | "
            f"{'estop daemon':>16} | {'first kill':>13} | {'raw sandboxed':>16} | "
            f"{'raw bare':>16} | surv | targets: daemon ≤ 1.2x raw, first kill ≤ 1 ms")
    print_head(head)
    for r in rows:
        cells = [cell(r, k, "max", 6, 1)
                 for k in ("estop_client_ms", "estop_daemon_ms")]
        cells.append(cell(r, "estop_first_kill_ms", "max", 5, 2))
        cells += [cell(r, k, "max", 6, 1)
                  for k in ("raw_cgroup_kill_ms", "raw_bare_cgroup_kill_ms")]
        met = [r["estop_daemon_ms"]["median"] <= 1.2 * r["raw_cgroup_kill_ms"]["median"],
               r["estop_first_kill_ms"]["max"] <= 1.0]
        print(f"{r['agents']:>6} {r['agents'] * PER_AGENT:>6} {r['reps']:>4} | "
              + " | ".join(f"{c:>16}" if i != 2 else f"{c:>13}" for i, c in enumerate(cells))
              + f" | {r['survivors']:>4} | " + " ".join("met" if m else "MISSED" for m in met))
    print("\ncells: median / max in ms; estop: command accepted to every cgroup verified empty"
          "\n(client: the RPC's wall time), first kill: accepted to the first cgroup.kill"
          " written;\nraw: first write to every cgroup empty, by hand, for trees like the agents'"
          " (sandboxed:\nthe same processes in bwrap with agentd's flags) and for bare ones")
    print(f"wrote {write_json('estop', rows, a.out, smoke=a.smoke)}")


if __name__ == "__main__":
    main()
