"""kill_all and wait_all_empty on real cgroups: many groups at once, through epoll.

More groups than wait_all_empty polls, so its epoll path runs; each holds a
sleeping shell. Judged by the kernel's cgroup.procs, never by time.
"""

from __future__ import annotations

import os
import time

import pytest

from daemon.cgroups import tree
from tests.scratch_agents import ScratchAgents

pytestmark = pytest.mark.root


@pytest.fixture
def scratch() -> ScratchAgents:  # type: ignore[misc]
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups)")
    s = ScratchAgents()
    try:
        yield s  # type: ignore[misc]
    finally:
        s.close()


def test_every_group_is_killed_and_seen_empty(scratch: ScratchAgents) -> None:
    n = tree._POLL_MAX + 8
    agents = [scratch.spawn(["/bin/sleep", "1000"]) for _ in range(n)]
    groups = [a.cgroup for a in agents]
    stamps = tree.kill_all(groups)
    assert len(stamps) == n and stamps == sorted(stamps)
    emptied = tree.wait_all_empty(groups, time.monotonic() + 30)
    assert set(emptied) == set(groups)
    assert all(g.pids() == [] for g in groups)
    for a in agents:
        a.proc.wait(timeout=10)


def test_a_group_still_populated_at_the_deadline_is_left_out(scratch: ScratchAgents) -> None:
    n = tree._POLL_MAX + 2
    agents = [scratch.spawn(["/bin/sleep", "1000"]) for _ in range(n)]
    victims, kept = agents[:-1], agents[-1]
    tree.kill_all(a.cgroup for a in victims)
    emptied = tree.wait_all_empty([a.cgroup for a in agents], time.monotonic() + 2)
    assert set(emptied) == {a.cgroup for a in victims}
    assert kept.cgroup.pids() == [kept.proc.pid]
