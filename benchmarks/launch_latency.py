"""Launch latency: a sandboxed agent through agentd, beside bare Popen and bwrap alone.

The agent is the same tiny program every time: /usr/bin/python3 -S -c that
prints CLOCK_MONOTONIC as its first act (the clock is shared by every
process on the host, namespaces included) and then waits. Measured:

* agentd: a signed Run RPC; from just before the RPC is sent to the agent's
  first instruction, and the RPC's own round trip (which includes the
  daemon's checks from outside, done before it answers);
* bwrap alone: the same bwrap command line agentd builds (same flags, the
  same seccomp filter), run by this benchmark directly as an unprivileged
  uid, no cgroup, no shim;
* bare Popen: subprocess.Popen of the program itself, as root, no sandbox.

Prints a table (milliseconds, median / p99), writes
benchmarks/results/launch_latency.json. Needs root. Never asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from common import add_smoke_flag, cell, dev_daemon, need_root, print_head, summary, write_json

from daemon.sandbox import bwrap, seccomp
from daemon.sandbox.policy import Profile
from tests.harness import AGENT_PYTHON, Daemon, alive

PROGRAM = [AGENT_PYTHON, "-S", "-c",
           "import time, sys\n"
           "sys.stdout.write(repr(time.clock_gettime(time.CLOCK_MONOTONIC)) + '\\n')\n"
           "sys.stdout.flush()\n"
           "time.sleep(60)\n"]
BENCH_UID = 61150  # below agentd's dynamic range: never one of its agents


def _first_line(path: Path, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return float(text.split()[0])
        time.sleep(0.0002)
    raise TimeoutError(f"no timestamp in {path}")


def bench_agentd(d: Daemon, i: int) -> tuple[float, float]:
    cmd = d.command()
    cmd.run.name = f"launch-{i}"
    cmd.run.argv.extend(PROGRAM)
    env = d.sign(cmd, d.keys.operator)
    t0 = time.monotonic()
    agent = d.stub.Run(env, timeout=30)
    t_reply = time.monotonic()
    t_agent = _first_line(Path(agent.stdout_log))
    d.kill(agent.name)
    return (t_agent - t0) * 1e3, (t_reply - t0) * 1e3


def _run_direct(argv: list[str], *, as_agent: bool, fds: tuple[int, ...] = ()) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            pass_fds=fds, close_fds=True,
                            **({"user": BENCH_UID, "group": BENCH_UID, "extra_groups": []}
                               if as_agent else {}))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    # bwrap's outer process forks the sandbox's init (pid 1 of its PID
    # namespace), which outlives a kill of the outer one (no
    # --die-with-parent: see daemon/sandbox/bwrap.py; agentd kills the whole
    # cgroup instead). Killing that init ends every process in the namespace
    # (pid_namespaces(7)); children first, before they are reparented.
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    return (float(line) - t0) * 1e3


def _children(ppid: int) -> list[int]:
    """Pids whose parent is ppid, from /proc/PID/stat."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2 :].split()[1] == str(ppid):
            out.append(int(entry.name))
    return out


def _strays(timeout: float = 5.0) -> list[int]:
    """Live processes still running as BENCH_UID after waiting up to timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and entry.stat().st_uid == BENCH_UID and alive(
                        int(entry.name)):
                    left.append(int(entry.name))
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def bench_bwrap() -> float:
    fd = seccomp.bpf_fd()
    try:
        argv = bwrap.argv(Profile(name="default"), PROGRAM, seccomp_fd=fd, hidden=[],
                          uid=BENCH_UID)
        return _run_direct(argv, as_agent=True, fds=(fd,))
    finally:
        os.close(fd)


def bench_popen() -> float:
    return _run_direct(PROGRAM, as_agent=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", type=Path)
    add_smoke_flag(ap)
    a = ap.parse_args()
    if a.smoke:
        a.reps = 1
    need_root("launch_latency")
    problem = bwrap.available()
    if problem:
        raise SystemExit(f"launch_latency: {problem}")
    agentd_first, agentd_rpc, bw, bare = [], [], [], []
    with dev_daemon() as d:
        for i in range(a.reps):
            first, rpc = bench_agentd(d, i)
            agentd_first.append(first)
            agentd_rpc.append(rpc)
            bw.append(bench_bwrap())
            bare.append(bench_popen())
    if left := _strays():
        raise SystemExit(f"launch_latency: processes of uid {BENCH_UID} left behind: {left}")
    rows: list[dict[str, Any]] = [
        {"what": "agentd Run -> agent's first instruction", "ms": summary(agentd_first)},
        {"what": "agentd Run RPC round trip (incl. checks)", "ms": summary(agentd_rpc)},
        {"what": "bwrap alone (same flags) -> first instruction", "ms": summary(bw)},
        {"what": "bare Popen -> first instruction", "ms": summary(bare)},
    ]
    print_head(f"{'launch':<46} | {'ms median / p99':>17}")
    for r in rows:
        print(f"{r['what']:<46} | {cell(r, 'ms')}")
    print(f"\n{a.reps} launches each; the program is python3 -S printing CLOCK_MONOTONIC")
    print(f"wrote {write_json('launch_latency', rows, a.out, smoke=a.smoke)}")


if __name__ == "__main__":
    main()
