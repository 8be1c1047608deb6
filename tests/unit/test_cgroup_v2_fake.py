"""The pure cgroup v2 code path with controllers, on a fake cgroupfs root.

The hybrid CI host's unified hierarchy has no controllers, so the v2 branch
that moves the daemon to a leaf, enables controllers and writes memory.max,
pids.max and cpu.max never runs against the kernel here (the suite's
summary says so). These tests run that logic on a directory tree laid out
as cgroupfs would be, with the control files the kernel would create
(opencontainers/cgroups tests its writers on t.TempDir() the same way).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.cgroups.layout import Mode, discover
from daemon.cgroups.limits import Limits
from daemon.cgroups.tree import AgentTree
from daemon.errors import CgroupError, ControllerUnavailable

CONTROL_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.events", "cgroup.kill",
                 "cgroup.freeze", "memory.max", "memory.swap.max", "pids.max", "cpu.max")


def _cgroup(path: Path, procs: str = "") -> Path:
    """A directory with the control files a v2 cgroup has."""
    path.mkdir(parents=True, exist_ok=True)
    for name in CONTROL_FILES:
        (path / name).touch()
    (path / "cgroup.procs").write_text(procs)
    (path / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    return path


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """A pure-v2 host: cgroup2 at ROOT/cg with every controller; we live in /agentd.service."""
    cg = tmp_path / "cg"
    _cgroup(cg)
    (cg / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    _cgroup(cg / "agentd.service", procs=f"{os.getpid()}\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n"
        f"35 22 0:30 / {cg} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
        "rw,nsdelegate,memory_recursiveprot\n")
    (proc / "cgroup").write_text("0::/agentd.service\n")
    return tmp_path


def _tree(fake: Path) -> AgentTree:
    return AgentTree(discover("auto", proc=fake / "proc"), "agentd")


def test_a_pure_v2_host_holds_every_controller_in_v2(fake: Path) -> None:
    layout = discover("auto", proc=fake / "proc")
    assert (layout.mode, layout.unified, layout.self_v2) == (Mode.V2, fake / "cg",
                                                             "/agentd.service")
    assert layout.v1 == {}
    assert {c: layout.holder(c) for c in ("memory", "pids", "cpu")} == dict.fromkeys(
        ("memory", "pids", "cpu"), "v2")


def test_prepare_moves_the_daemon_to_a_leaf_and_enables_controllers(fake: Path) -> None:
    service = fake / "cg" / "agentd.service"
    _cgroup(service / "supervisor")
    _cgroup(service / "agentd")
    tree = _tree(fake)
    tree.prepare()
    # "No internal processes" (cgroups(7)): the daemon leaves the cgroup
    # whose subtree_control it writes.
    assert (service / "supervisor" / "cgroup.procs").read_text() == str(os.getpid())
    assert (service / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (service / "agentd" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert tree.base_v2 == service / "agentd"
    assert tree.base_v1 == {}
    assert tree.has_cgroup_kill


def test_prepare_refuses_to_share_its_cgroup_with_other_processes(fake: Path) -> None:
    service = fake / "cg" / "agentd.service"
    (service / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    with pytest.raises(CgroupError, match=r"holds other processes \(1\).*Delegate=yes"):
        _tree(fake).prepare()


def test_limits_go_to_the_v2_files_and_read_back(fake: Path) -> None:
    service = fake / "cg" / "agentd.service"
    _cgroup(service / "supervisor")
    _cgroup(service / "agentd")
    tree = _tree(fake)
    tree.prepare()
    group = tree.agent("worker-1")
    _cgroup(group.v2)  # what the kernel's mkdir would create
    group.create()
    try:
        group.apply_limits(Limits(memory_bytes=512 << 20, pids_max=64, cpu_millis=500))
        assert (group.v2 / "memory.max").read_text() == str(512 << 20)
        # Swap off whatever the memory limit: memory never reaches disk.
        assert (group.v2 / "memory.swap.max").read_text() == "0"
        assert (group.v2 / "pids.max").read_text() == "64"
        assert (group.v2 / "cpu.max").read_text() == "50000 100000"
        assert group.read_limits() == {"memory": str(512 << 20), "swap": "swap.max 0",
                                       "pids": "64", "cpu": "50000 100000"}
    finally:
        group.close()


def test_a_limit_no_hierarchy_holds_is_refused_not_ignored(fake: Path) -> None:
    (fake / "cg" / "cgroup.controllers").write_text("cpu memory\n")
    tree = _tree(fake)
    group = tree.agent("worker-2")
    with pytest.raises(ControllerUnavailable, match="no cgroup hierarchy on this host offers "
                                                    "the pids controller"):
        group.apply_limits(Limits(pids_max=64))
    assert not group.v2.exists()
