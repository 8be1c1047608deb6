"""The enforcement loop beats for the watchdogs only while every liveness check passes."""

from __future__ import annotations

import threading
import time

from daemon.supervisor.enforcer import Enforcer
from tests.harness import wait_for


def test_a_failing_liveness_check_stops_the_heartbeats_until_it_recovers() -> None:
    beats: list[float] = []
    checks: list[bool] = []
    alive = threading.Event()
    alive.set()

    def probe() -> bool:
        ok = alive.is_set()
        checks.append(ok)
        return ok

    e = Enforcer(lambda expired: None, reactor_tick=time.monotonic, tick_s=0.01)
    e.add_heartbeat(lambda: beats.append(time.monotonic()))
    e.add_liveness("API self-probe", probe)
    e.start()
    try:
        assert wait_for(lambda: len(beats) >= 3, 10)
        alive.clear()
        # Once a pass has seen the failure, no pass beats: count passes, not time.
        assert wait_for(lambda: checks.count(False) >= 1, 10)
        stopped_at = len(beats)
        assert wait_for(lambda: checks.count(False) >= 20, 10)
        assert len(beats) == stopped_at, "heartbeats went on while the API was wedged"
        # The loop itself still ticks (leases are still enforced), beating or not.
        ticked = e.last_tick
        assert wait_for(lambda: e.last_tick > ticked, 10)
        alive.set()
        assert wait_for(lambda: len(beats) > stopped_at, 10)
    finally:
        e.stop()


def test_a_liveness_check_that_raises_counts_as_failing() -> None:
    beats: list[int] = []

    def broken() -> bool:
        raise RuntimeError("probe exploded")

    e = Enforcer(lambda expired: None, reactor_tick=time.monotonic, tick_s=0.01)
    e.add_heartbeat(lambda: beats.append(1))
    calls: list[int] = []
    # Checked first, so each pass is counted before the broken check fails it.
    e.add_liveness("counted", lambda: calls.append(1) or True)  # type: ignore[func-returns-value]
    e.add_liveness("broken", broken)
    e.start()
    try:
        assert wait_for(lambda: len(calls) >= 20, 10)
        assert beats == []
    finally:
        e.stop()
