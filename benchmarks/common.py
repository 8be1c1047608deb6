"""What the benchmarks share: dev daemons, process trees, a scratch cgroup, summaries, output."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# `--smoke` runs write here, never over the real results (git-ignored, as RESULTS is).
SMOKE_RESULTS = RESULTS / "smoke"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness import BENCH_PREFIX, Daemon  # noqa: E402 - needs REPO on sys.path

# The raw baselines' sandboxes run as this uid: below agentd's dynamic range,
# never one of its agents (launch_latency's BENCH_UID is another).
SANDBOX_UID = 61151


@contextmanager
def dev_daemon(**kw: Any) -> Iterator[Daemon]:
    """A started agentd --dev in a fresh temp dir, its cgroups named BENCH_PREFIX*.

    kw goes to tests.harness.Daemon. On the way out, error or not (a failed
    start included), the daemon is stopped, which kills its agents, and its
    directory removed; on an error its stderr's tail is printed first.
    """
    root = Path(tempfile.mkdtemp(prefix=BENCH_PREFIX))
    d = Daemon(root / "dev", cgroup_prefix=BENCH_PREFIX, **kw)
    try:
        yield d.start()
    except BaseException:
        print(f"agentd's stderr (tail):\n{d.stderr()}", file=sys.stderr)
        raise
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def add_smoke_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true",
                    help="one repetition at the smallest size: checks that the benchmark "
                         "runs, measures nothing (JSON to results/smoke/)")


def tree_script(n: int, escaped_every: int = 10) -> str:
    """A shell that leaves exactly n processes: n-1 sleeps (every tenth escaped), then execs."""
    escaped = (n - 1) // escaped_every if escaped_every else 0
    plain = n - 1 - escaped
    parts = []
    if plain:
        parts.append(f"i=0; while [ $i -lt {plain} ]; do sleep 1000 & i=$((i+1)); done")
    if escaped:
        parts.append(f"i=0; while [ $i -lt {escaped} ]; do setsid sleep 1000 & i=$((i+1)); done")
    parts.append("exec sleep 1000")
    return "; ".join(parts)


def wait_count(procs: Path, n: int, timeout: float = 120.0) -> None:
    """Wait until the cgroup.procs file lists at least n processes."""
    deadline = time.monotonic() + timeout
    while len(procs.read_text().split()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{procs} never reached {n} processes")
        time.sleep(0.01)


def populated(cg: Path) -> bool:
    return "populated 1" in (cg / "cgroup.events").read_text()


def spin_until_empty(groups: list[Path]) -> dict[Path, float]:
    """Poll every cgroup until empty; returns when (perf_counter) each one emptied."""
    pending = set(groups)
    done: dict[Path, float] = {}
    delay = 20e-6
    while pending:
        for cg in [c for c in pending if not populated(c)]:
            done[cg] = time.perf_counter()
            pending.discard(cg)
        if pending:
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
    return done


def write_kill(cg: Path) -> None:
    fd = os.open(cg / "cgroup.kill", os.O_WRONLY)
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)


class Scratch:
    """Bench cgroups of our own in the v2 hierarchy, for the raw baselines."""

    def __init__(self) -> None:
        from daemon.cgroups.layout import discover

        self.base = discover().unified / f"{BENCH_PREFIX}{uuid.uuid4().hex[:8]}"
        self.base.mkdir()
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, n: int, *, own_pgrp: bool = False, escaped_every: int = 10,
              wait: bool = True) -> tuple[Path, subprocess.Popen[bytes]]:
        """A tree of n processes in a fresh child cgroup (the shell joins it before forking)."""
        cg = self.base / uuid.uuid4().hex[:8]
        cg.mkdir()
        script = f"echo $$ > {cg}/cgroup.procs; {tree_script(n, escaped_every)}"
        proc = subprocess.Popen(["/bin/sh", "-c", script], start_new_session=own_pgrp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._procs.append(proc)
        if wait:
            wait_count(cg / "cgroup.procs", n)
        return cg, proc

    def spawn_sandboxed(self, n: int, *, uid: int = SANDBOX_UID) -> Path:
        """n processes in bwrap's sandbox (agentd's flags), in a fresh child cgroup.

        What agentd's raw baselines kill: the same trees it launches (bwrap's
        outer process and its init beside the n, its namespaces and mounts),
        not bare processes. The shell joins the cgroup as root, then setpriv
        drops to uid and execs bwrap. Does not wait for the tree.
        """
        from daemon.sandbox import bwrap, seccomp
        from daemon.sandbox.policy import Profile

        cg = self.base / uuid.uuid4().hex[:8]
        cg.mkdir()
        fd = seccomp.bpf_fd()
        try:
            argv = bwrap.argv(Profile(name="default"), ["/bin/sh", "-c", tree_script(n, 0)],
                              seccomp_fd=fd, hidden=[], uid=uid)
            script = (f'echo $$ > {cg}/cgroup.procs && exec setpriv --reuid={uid} '
                      f'--regid={uid} --clear-groups "$@"')
            proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv], pass_fds=(fd,),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(fd)
        self._procs.append(proc)
        return cg

    def cleanup(self) -> None:
        """Kill and remove every cgroup made here."""
        groups = [p for p in self.base.iterdir() if p.is_dir()]
        for cg in groups:
            write_kill(cg)
        spin_until_empty(groups)
        for proc in self._procs:
            proc.wait()
        self._procs.clear()
        for cg in groups:
            cg.rmdir()

    def close(self) -> None:
        self.cleanup()
        self.base.rmdir()

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def summary(xs: list[float]) -> dict[str, float]:
    """median, p99 (nearest rank), max and count."""
    s = sorted(xs)
    if not s:
        return {"median": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {"median": statistics.median(s), "p99": p99, "max": s[-1], "n": len(s)}


def write_json(name: str, rows: list[dict[str, Any]], out: Path | None = None, *,
               smoke: bool = False) -> Path:
    """Write rows to out [default: results/NAME.json, or results/smoke/NAME.json]."""
    path = out or (SMOKE_RESULTS if smoke else RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "host": os.uname().nodename,
                                "kernel": os.uname().release, "rows": rows}, indent=2))
    return path


def need_root(name: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"{name}: needs root (cgroups)")


def cell(row: dict[str, Any], key: str, second: str = "p99", width: int = 7,
         digits: int = 2) -> str:
    """'median / second' of row[key] (a summary() dict), for a table cell."""
    s = row[key]
    return f"{s['median']:{width}.{digits}f} / {s[second]:{width}.{digits}f}"


def print_head(head: str) -> None:
    """A table header and its rule."""
    print(head)
    print("-" * len(head))
