"""Every benchmark once at its smallest size (--smoke): fails if one crashes or leaves agents.

Runs each benchmark (every module here but common.py) as its own process,
one after another, and after each compares the benchmarks' cgroups
(agentd-bench-*) and the processes in them with what was there before.
Measures nothing and asserts no time: the tables it shows are one
repetition each. JSON goes to benchmarks/results/smoke/.

Exit status 1 if a benchmark exited non-zero, overran its time, or left a
cgroup or a process behind; 0 otherwise. Needs root.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from common import need_root

from tests.harness import BENCH_PREFIX, leaked_cgroups, leaked_processes

HERE = Path(__file__).resolve().parent
# Every module here but the shared helpers and this one: a new benchmark is
# smoke-tested from the start (and must take --smoke).
BENCHMARKS = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("common", "smoke"))
# Far above a smoke run's few seconds: only a hung benchmark reaches it.
TIMEOUT_S = 300.0


def _leftovers() -> set[str]:
    # mark=None: hostile programs are the test suite's, maybe running beside us.
    return set(leaked_processes(BENCH_PREFIX, mark=None)) | set(leaked_cgroups(BENCH_PREFIX))


def _run(name: str) -> int | str:
    """Run one benchmark with --smoke; its exit code, or why it was stopped."""
    proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), "--smoke"])
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGTERM: Python turns it into KeyboardInterrupt, so the
        # benchmark's with/finally blocks stop its daemon and remove its cgroups.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return f"overran {TIMEOUT_S:.0f} s"


def main() -> None:
    need_root("smoke")
    before = _leftovers()
    failed: list[str] = []
    t_all = time.monotonic()
    for name in BENCHMARKS:
        print(f"=== {name} --smoke", flush=True)
        t0 = time.monotonic()
        rc = _run(name)
        took = time.monotonic() - t0
        # A daemon's teardown is over when it exits; allow the kernel a moment
        # to finish removing what was rmdir'd.
        deadline = time.monotonic() + 5
        while (left := _leftovers() - before) and time.monotonic() < deadline:
            time.sleep(0.1)
        problems = [] if rc == 0 else [f"exit {rc}" if isinstance(rc, int) else rc]
        if left:
            problems.append("left behind:\n    " + "\n    ".join(sorted(left)))
        if problems:
            failed.append(name)
        print(f"=== {name}: {'; '.join(problems) or 'ok'} ({took:.1f} s)\n", flush=True)
    total = time.monotonic() - t_all
    if failed:
        sys.exit(f"bench-smoke: failed: {', '.join(failed)} ({total:.0f} s)")
    print(f"bench-smoke: all {len(BENCHMARKS)} benchmarks ran ({total:.0f} s)")


if __name__ == "__main__":
    main()
