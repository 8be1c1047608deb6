"""Tripwire throughput: the daemon's CPU per MB of agent output, and write-to-action delay.

An agent (running as nobody, like any other) writes benign log-like text at a
paced 50 MB/s (and, separately, as fast as the pipe takes it) for a few
seconds. Every 0.12 s it writes a sentinel line carrying its own
CLOCK_MONOTONIC time, which one of ten sentinel rules matches (ten, so that
the one-record-per-rule-per-second audit limit never hides one). The
tripwire audit record carries the daemon's monotonic time of detection
(``detected_mono``) and of the action's end (``done_mono``): the clock is
shared, so the differences are the delays.

Measured, for each rule set (none; the built-in list; the built-in list and
200 more literals):

* the daemon's CPU seconds per MB written, from /proc/PID/stat utime+stime
  around the run (whole daemon: reactor, sampler, everything);
* the writer's achieved MB/s: below the target means the daemon throttled it
  (the pipe is full while the reactor is busy);
* write -> detection delay of the sentinels: median / p99 / max;
* write -> action done for a kill rule (verified empty) and a freeze rule
  (kernel reports frozen), a few repetitions each, under the same load.

Prints a table, writes JSON to benchmarks/results/tripwire_throughput.json.
Needs root. Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from agentd.v1 import agentd_pb2
from common import add_smoke_flag, dev_daemon, need_root, summary, write_json

from tests.harness import AGENT_PYTHON, Daemon, code_parent, wait_for

WRITER = r'''
import json, os, random, sys, time
rate = float(sys.argv[1]) * 1e6     # bytes per second; 0: as fast as the pipe takes it
duration = float(sys.argv[2])
every = float(sys.argv[3])          # sentinel period (s)
mode = sys.argv[4]                  # "rotate": SENTINEL-0..9; "kill"/"freeze": one at `every`
words = ("the model loss step batch epoch value training eval accuracy gradient token "
         "output result parameter function compute data file line config update").split()
random.seed(1)
lines, size = [], 0
while size < 65536:
    line = " ".join(random.choice(words) for _ in range(random.randint(6, 14))) + f" {size}\n"
    lines.append(line)
    size += len(line)
block = "".join(lines).encode()[:65536]
block = block[:block.rindex(b"\n") + 1]
t0 = time.monotonic()
written, k, next_s = 0, 0, t0 + every
while True:
    now = time.monotonic()
    if now - t0 >= duration:
        break
    if now >= next_s:
        ns = time.monotonic_ns()
        if mode == "rotate":
            line = b"SENTINEL-%d %d\n" % (k % 10, ns)
            next_s += every
        else:
            line = b"%s-SENTINEL %d\n" % (mode.upper().encode(), ns)
            next_s = float("inf")
        os.write(1, line)
        written += len(line)
        k += 1
        continue
    if rate and written > rate * (now - t0):
        time.sleep(0.0005)
        continue
    written += os.write(1, block)
elapsed = time.monotonic() - t0
sys.stderr.write(json.dumps({"bytes": written, "seconds": elapsed, "sentinels": k}) + "\n")
'''

SENTINEL_RULES = "".join(
    f'[[rule]]\nname = "sentinel-{k}"\nkind = "regex"\npattern = \'SENTINEL-{k} [0-9]+\'\n'
    f'case_insensitive = false\n\n' for k in range(10)) + """
[[rule]]
name = "bench-kill"
kind = "regex"
pattern = 'KILL-SENTINEL [0-9]+'
case_insensitive = false
action = "kill"

[[rule]]
name = "bench-freeze"
kind = "regex"
pattern = 'FREEZE-SENTINEL [0-9]+'
case_insensitive = false
action = "freeze"
"""


def _builtin_toml() -> str:
    from daemon.monitor import rules

    out = []
    for r in rules.BUILTIN:
        out.append("[[rule]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in r.items()))
    return "\n".join(out) + "\n"


def _toml(v: object) -> str:
    if isinstance(v, str):
        # TOML literal strings: no escapes, so a regex's backslashes stay as they are.
        return "'" + v + "'" if "'" not in v else "'''" + v + "'''"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _extra_literals(n: int) -> str:
    return "".join(f'[[rule]]\nname = "extra-{i}"\nkind = "literal"\n'
                   f'pattern = "forbidden phrase number {i} here"\n\n' for i in range(n))


CONFIGS: dict[str, str] = {
    "no rules": "",
    "built-in + sentinels": "builtin sentinels",
    "built-in + sentinels + 200 literals": "builtin sentinels extra",
}


def _rules_text(spec: str) -> str:
    text = ""
    if "builtin" in spec:
        text += _builtin_toml()
    if "sentinels" in spec:
        text += SENTINEL_RULES
    if "extra" in spec:
        text += _extra_literals(200)
    return text


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    """One daemon (started with one rule set) and the writer agent's program."""

    def __init__(self, d: Daemon, prog: Path) -> None:
        self.d = d
        self.prog = prog
        self.n = 0

    def run(self, rate: float, duration: float, every: float, mode: str,
            ) -> tuple[str, agentd_pb2.Agent, float]:
        self.n += 1
        name = f"writer-{self.n}"
        cpu0 = _cpu_s(self.d.pid)
        a = self.d.run(name, [AGENT_PYTHON, str(self.prog), str(rate), str(duration),
                              str(every), mode])
        return name, a, cpu0

    def ended(self, name: str) -> bool:
        return self.d.get(name).state in (agentd_pb2.AGENT_STATE_EXITED,
                                          agentd_pb2.AGENT_STATE_KILLED)

    def records(self, agent_id: str) -> list[dict[str, Any]]:
        return [r for r in self.d.audit_records()
                if r["event"] == "tripwire" and r.get("agent_id") == agent_id]


def throughput(b: Bench, rate: float, duration: float) -> dict[str, Any]:
    name, a, cpu0 = b.run(rate, duration, 0.12, "rotate")
    assert wait_for(lambda: b.ended(name), duration + 60), f"{name} did not finish"
    time.sleep(0.3)  # the last records' fsync
    cpu = _cpu_s(b.d.pid) - cpu0
    stats = _writer_stats(a.stderr_log)
    mb = stats["bytes"] / 1e6
    delays = []
    for r in b.records(a.id):
        m = re.search(r"SENTINEL-(\d) (\d+)", str(r["excerpt"]))
        if m and str(r["rule"]) == f"sentinel-{m.group(1)}":
            delays.append((float(r["detected_mono"]) - int(m.group(2)) / 1e9) * 1e3)
    return {
        "target_mb_s": rate or "max", "seconds": round(stats["seconds"], 3),
        "mb_written": round(mb, 1), "achieved_mb_s": round(mb / stats["seconds"], 1),
        "daemon_cpu_s": round(cpu, 3), "cpu_ms_per_mb": round(cpu / mb * 1e3, 3),
        "sentinels_written": stats["sentinels"], "sentinels_detected": len(delays),
        "write_to_detect_ms": summary(delays),
    }


def _writer_stats(stderr_log: str) -> dict[str, Any]:
    text = Path(stderr_log).read_text()
    return json.loads(text.strip().splitlines()[-1])


def _one_action(b: Bench, mode: str, rate: float) -> tuple[float, float]:
    """One agent under load writes one kill or freeze sentinel; (write->detect, write->done) ms."""
    name, a, _ = b.run(rate, 30.0, 1.0, mode)
    rule = f"bench-{mode}"
    assert wait_for(lambda: [r for r in b.records(a.id) if r["rule"] == rule], 20), (
        f"no {rule} record")
    rec = next(r for r in b.records(a.id) if r["rule"] == rule)
    m = re.search(r"SENTINEL (\d+)", str(rec["excerpt"]))
    assert m, rec
    wrote = int(m.group(1)) / 1e9
    if not b.ended(name):
        b.d.kill(name)
    wait_for(lambda: b.ended(name), 10)
    return ((float(rec["detected_mono"]) - wrote) * 1e3,
            (float(rec["done_mono"]) - wrote) * 1e3)


def action_delay(b: Bench, mode: str, reps: int, rate: float) -> dict[str, Any]:
    runs = [_one_action(b, mode, rate) for _ in range(reps)]
    return {"action": mode, "reps": reps, "load_mb_s": rate,
            "write_to_detect_ms": summary([d for d, _ in runs]),
            "write_to_done_ms": summary([x for _, x in runs])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=50.0, help="paced rate in MB/s [50]")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each run [5]")
    ap.add_argument("--reps", type=int, default=5, help="kill and freeze repetitions [5]")
    ap.add_argument("--out", type=Path, help="JSON output [default: results/...]")
    add_smoke_flag(ap)
    a = ap.parse_args()
    if a.smoke:
        a.seconds, a.reps = 1.0, 1
    need_root("tripwire_throughput")
    work = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
    # Where agents' sandboxes can read it (their /tmp is their own).
    progdir = Path(tempfile.mkdtemp(prefix="agentd-bench-writer-", dir=code_parent()))
    os.chmod(progdir, 0o755)
    prog = progdir / "writer.py"
    prog.write_text(WRITER)
    os.chmod(prog, 0o644)
    rows: list[dict[str, Any]] = []
    actions: list[dict[str, Any]] = []
    try:
        for label, spec in CONFIGS.items():
            rules = work / (label.replace(" ", "_").replace("+", "") + ".toml")
            rules.write_text(_rules_text(spec))
            with dev_daemon(config=f'rules_file = "{rules}"\n') as d:
                b = Bench(d, prog)
                for rate in (a.rate, 0.0):
                    row = throughput(b, rate, a.seconds)
                    row["rules"] = label
                    rows.append(row)
                    print(f"  {label:<36} target {row['target_mb_s']!s:>4}: "
                          f"{row['achieved_mb_s']:6.1f} MB/s, "
                          f"{row['cpu_ms_per_mb']:.2f} ms CPU/MB", flush=True)
                if spec == "builtin sentinels":
                    for mode in ("kill", "freeze"):
                        actions.append(action_delay(b, mode, a.reps, a.rate))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(progdir, ignore_errors=True)
    print_tables(rows, actions)
    path = write_json("tripwire_throughput", rows + actions, a.out, smoke=a.smoke)
    print(f"\nwrote {path}")


def _ms(s: dict[str, float]) -> str:
    if not s["n"]:
        return "-"
    return f"{s['median']:.2f} / {s['p99']:.2f} / {s['max']:.2f}"


def print_tables(rows: list[dict[str, Any]], actions: list[dict[str, Any]]) -> None:
    print(f"\n{'rules':<36} {'target':>7} {'achieved':>9} {'CPU/MB':>8} "
          f"{'sentinels':>10}  write->detect ms (median / p99 / max)")
    print("-" * 110)
    for r in rows:
        print(f"{r['rules']:<36} {r['target_mb_s']!s:>7} {r['achieved_mb_s']:>7.1f}/s "
              f"{r['cpu_ms_per_mb']:>6.2f}ms "
              f"{r['sentinels_detected']:>4}/{r['sentinels_written']:<5}"
              f"  {_ms(r['write_to_detect_ms'])}")
    print(f"\n{'action':<8} {'reps':>4} {'load':>8}  {'write->detect ms':>24}  "
          f"{'write->done ms':>24}   (median / p99 / max)")
    print("-" * 80)
    for r in actions:
        print(f"{r['action']:<8} {r['reps']:>4} {r['load_mb_s']:>5.0f}MB/s  "
              f"{_ms(r['write_to_detect_ms']):>24}  {_ms(r['write_to_done_ms']):>24}")
    print("\nCPU/MB: the whole daemon's CPU time over the run / MB written. 'achieved' below "
          "the target: the daemon throttled the writer. done: kill verified empty / frozen.")


if __name__ == "__main__":
    main()
