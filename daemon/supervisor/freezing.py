"""Freeze and thaw: stop an agent where it stands, for inspection, through the cgroup freezer.

A frozen agent stays killable at once: frozen
tasks take cgroup.kill (cgroup-v2.rst), and a stop of a frozen agent kills it
without thawing it (killer.stop).
"""

from __future__ import annotations

import time

from daemon.errors import CgroupError
from daemon.supervisor.agent import Agent, State

FREEZE_TIMEOUT_S = 5.0


def freeze_agent(agent: Agent, frozen: bool) -> tuple[bool, float]:
    """Freeze or thaw agent through its cgroup; (verified by the kernel, ms taken).

    Also the tripwires' "freeze" action. Nothing here stands in the way of
    a kill: frozen tasks take cgroup.kill.
    """
    t0 = time.monotonic()
    try:
        done = agent.cgroup.freeze(frozen, FREEZE_TIMEOUT_S)
    except CgroupError:
        if agent.is_ended:
            return False, (time.monotonic() - t0) * 1e3
        raise
    if done:
        with agent.lock:
            if not agent.is_ended and not agent.kill_requested:
                agent.state = State.FROZEN if frozen else State.RUNNING
    return done, (time.monotonic() - t0) * 1e3
