"""Where the cgroup hierarchies are and which one holds each controller.

Two host layouts are supported:

* pure cgroup v2: one hierarchy (usually /sys/fs/cgroup) holds every
  controller;
* hybrid: v1 hierarchies hold the controllers (memory, pids, cpu, freezer)
  and the v2 hierarchy is mounted at /sys/fs/cgroup/unified with few or no
  controllers. cgroup.kill, cgroup.events and cgroup.freeze exist in every
  non-root v2 cgroup even with no controllers enabled, so the kill path uses
  the v2 hierarchy on both layouts (cgroups(7), "Cgroups version 2
  cgroup.kill file").

A legacy host without any v2 hierarchy is refused: without cgroup.kill and
cgroup.events the kill cannot be verified the way this daemon promises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from daemon.cgroups import fs
from daemon.errors import ConfigError

# The controllers agentd sets limits with, plus the v1 freezer for the
# fallback kill on kernels without cgroup.kill.
LIMIT_CONTROLLERS = ("memory", "pids", "cpu")


class Mode(enum.StrEnum):
    V2 = "v2"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class Layout:
    """The cgroup hierarchies as seen by this process."""

    mode: Mode
    unified: Path  # mount point of the v2 hierarchy
    self_v2: str  # this process's cgroup in the v2 hierarchy ("/..." relative to unified)
    # v1 controller name -> (mount point, this process's cgroup in that hierarchy).
    # Empty in V2 mode.
    v1: dict[str, tuple[Path, str]] = field(default_factory=dict)
    v2_controllers: frozenset[str] = frozenset()

    def holder(self, controller: str) -> str | None:
        """Which hierarchy holds controller: "v1", "v2", or None if neither."""
        if controller in self.v1:
            return "v1"
        if controller in self.v2_controllers:
            return "v2"
        return None


def _mounts(mountinfo: str) -> tuple[Path | None, dict[str, Path]]:
    """Parse /proc/self/mountinfo into (v2 mount point, {v1 controller: mount point})."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        # proc(5): "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, super_opts = Path(fields[4]), tail[0], tail[2]
        if fstype == "cgroup2" and unified is None:
            unified = mount_point
        elif fstype == "cgroup":
            for opt in super_opts.split(","):
                if opt in (*LIMIT_CONTROLLERS, "freezer") and opt not in v1:
                    v1[opt] = mount_point
    return unified, v1


def _self_paths(proc_cgroup: str) -> tuple[str | None, dict[str, str]]:
    """Parse /proc/self/cgroup into (v2 path, {v1 controller: path})."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path
        else:
            for c in controllers.split(","):
                v1[c] = path
    return v2, v1


def discover(mode: str = "auto", proc: Path = Path("/proc/self")) -> Layout:
    """Find the hierarchies. mode "auto", "v2" or "hybrid". Raises ConfigError.

    "v2" on a hybrid host uses the unified hierarchy alone (limits are then
    only available for controllers it holds); it exists so that the pure-v2
    code path runs on hybrid CI machines too.
    """
    unified, v1_mounts = _mounts(fs.read(proc / "mountinfo"))
    self_v2, self_v1 = _self_paths(fs.read(proc / "cgroup"))
    if unified is None or self_v2 is None:
        raise ConfigError(
            "no cgroup v2 hierarchy is mounted: agentd needs one for cgroup.kill and "
            "cgroup.events (mount cgroup2, e.g. at /sys/fs/cgroup/unified)"
        )
    v2_controllers = frozenset(fs.read(unified / "cgroup.controllers").split())
    if mode == "auto":
        mode = Mode.HYBRID if v1_mounts else Mode.V2
    if mode not in (Mode.V2, Mode.HYBRID):
        raise ConfigError(f"cgroup mode {mode!r} is not one of auto, v2, hybrid")
    if mode == Mode.HYBRID and not v1_mounts:
        raise ConfigError("cgroup mode 'hybrid' asked for, but no v1 controller is mounted")
    v1: dict[str, tuple[Path, str]] = {}
    if mode == Mode.HYBRID:
        for controller, mount in v1_mounts.items():
            if controller in self_v1:
                v1[controller] = (mount, self_v1[controller])
    return Layout(
        mode=Mode(mode),
        unified=unified,
        self_v2=self_v2,
        v1=v1,
        v2_controllers=v2_controllers,
    )
