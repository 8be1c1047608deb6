"""Resource limits of an agent's cgroup: written to whichever hierarchy holds each
controller, and read back for the sandbox's checks from outside."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.cgroups import fs
from daemon.cgroups.layout import Layout
from daemon.errors import ControllerUnavailable

CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 0  # 0: none
    pids_max: int = 0  # 0: none
    cpu_millis: int = 0  # 0: none


def apply(layout: Layout, v2: Path, v1: Mapping[str, Path], limits: Limits) -> None:
    """Write the limits to an agent's cgroup (v2, and v1 by controller) where each is held.

    Raises ControllerUnavailable if a limit is asked for and no hierarchy
    holds its controller, CgroupError if a write fails.
    """
    wanted = {
        "memory": limits.memory_bytes,
        "pids": limits.pids_max,
        "cpu": limits.cpu_millis,
    }
    for controller, value in wanted.items():
        if value and layout.holder(controller) is None:
            raise ControllerUnavailable(
                f"a {controller} limit was asked for, but no cgroup hierarchy on this host "
                f"offers the {controller} controller to agentd"
            )
    if limits.memory_bytes:
        if layout.holder("memory") == "v1":
            mem = v1["memory"]
            fs.write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            # Swap off: memory+swap capped at the memory limit. The file
            # exists only with swap accounting (swapaccount=1); without
            # it swap cannot be limited per cgroup (read_limits says so).
            if fs.exists(mem / "memory.memsw.limit_in_bytes"):
                fs.write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        else:
            fs.write(v2 / "memory.max", str(limits.memory_bytes))
    if layout.holder("memory") == "v2" and fs.exists(v2 / "memory.swap.max"):
        # Swap off on v2 whatever the memory limit: an agent's memory is
        # never written to disk, where it would outlive the agent.
        fs.write(v2 / "memory.swap.max", "0")
    if limits.pids_max:
        if layout.holder("pids") == "v1":
            fs.write(v1["pids"] / "pids.max", str(limits.pids_max))
        else:
            fs.write(v2 / "pids.max", str(limits.pids_max))
    if limits.cpu_millis:
        quota = max(1000, limits.cpu_millis * CPU_PERIOD_US // 1000)
        if layout.holder("cpu") == "v1":
            cpu = v1["cpu"]
            fs.write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            fs.write(cpu / "cpu.cfs_quota_us", str(quota))
        else:
            fs.write(v2 / "cpu.max", f"{quota} {CPU_PERIOD_US}")


def read(layout: Layout, v2: Path, v1: Mapping[str, Path]) -> dict[str, str]:
    """The limits in force, read back from cgroupfs: memory, swap, pids, cpu.

    Values as the kernel writes them ("max" for none, v1's huge number
    for none, "-" when no hierarchy holds the controller). For the
    sandbox's checks from outside; raises CgroupError.
    """
    out = {"memory": "-", "swap": "-", "pids": "-", "cpu": "-"}
    holder = layout.holder("memory")
    if holder == "v1":
        mem = v1["memory"]
        out["memory"] = fs.read(mem / "memory.limit_in_bytes").strip()
        memsw = mem / "memory.memsw.limit_in_bytes"
        out["swap"] = (f"memsw {fs.read(memsw).strip()}" if fs.exists(memsw)
                       else "no swap accounting")
    elif holder == "v2":
        out["memory"] = fs.read(v2 / "memory.max").strip()
        swap = v2 / "memory.swap.max"
        out["swap"] = (f"swap.max {fs.read(swap).strip()}" if fs.exists(swap)
                       else "no swap accounting")
    holder = layout.holder("pids")
    if holder is not None:
        base = v1["pids"] if holder == "v1" else v2
        out["pids"] = fs.read(base / "pids.max").strip()
    holder = layout.holder("cpu")
    if holder == "v1":
        out["cpu"] = fs.read(v1["cpu"] / "cpu.cfs_quota_us").strip()
    elif holder == "v2":
        out["cpu"] = fs.read(v2 / "cpu.max").strip()
    return out
