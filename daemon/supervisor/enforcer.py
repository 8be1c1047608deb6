"""The enforcement loop: lease and run-time deadlines, and the heartbeat the watchdogs watch.

Deadlines use the monotonic clock, never wall time: a clock step must not
extend or cut short a lease. They are kept in a heap, so the loop finds the
earliest in O(1) and sleeps until it (or one tick): an expiry is acted on
within a scheduler wake-up of its deadline, not at the next poll, and a
thousand leases cost nothing while none is due.

Liveness: every pass records last_tick and calls the heartbeats (the
guardian's pipe). The systemd watchdog is pinged from this loop too, and
only while the reactor (output and reaping) has also ticked recently: a
stalled enforcement loop, or a stalled reaper, stops the pings even if other
threads still run (sd_watchdog_enabled(3), systemd.service(5) WatchdogSec=).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from systemd.daemon import notify as sd_notify

from daemon.supervisor.agent import Agent

log = logging.getLogger(__name__)

# (agent, kind, the monotonic deadline that passed)
Expired = list[tuple[Agent, str, float]]


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, if systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


class Enforcer:
    """One thread. Thread-safe set/clear of deadlines."""

    def __init__(
        self,
        on_expired: Callable[[Expired], None],
        *,
        reactor_tick: Callable[[], float],
        tick_s: float = 0.1,
    ) -> None:
        self._on_expired = on_expired
        self._reactor_tick = reactor_tick
        self._tick = tick_s
        self._cond = threading.Condition()
        # agent id -> kind -> (monotonic deadline, agent): what holds.
        self._deadlines: dict[str, dict[str, tuple[float, Agent]]] = {}
        # (deadline, seq, agent id, kind): a min-heap over _deadlines. An entry
        # whose deadline no longer matches _deadlines (renewed, cleared) is
        # stale and skipped when it comes up; _push compacts the heap when
        # stale entries outnumber live ones.
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._live = 0
        self._heartbeats: list[Callable[[], None]] = []
        # What must also be alive for a heartbeat: name -> check (see add_liveness).
        self._liveness: dict[str, Callable[[], bool]] = {}
        self._dead: str | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="agentd-enforcer", daemon=True)
        self.last_tick = time.monotonic()
        self._watchdog = watchdog_interval()
        self._last_ping = 0.0

    # ------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def add_heartbeat(self, fn: Callable[[], None]) -> None:
        """Call fn on every pass of the loop (at least every tick)."""
        self._heartbeats.append(fn)

    def add_liveness(self, name: str, check: Callable[[], bool]) -> None:
        """Beat only while check() is true too (the API's self-probe: a kill would be served).

        A failing check stops systemd's watchdog pings and the guardian's
        heartbeats: fail closed, the agents are killed and the daemon restarted.
        """
        self._liveness[name] = check

    # ---------------------------------------------------------- deadlines
    def set(self, agent: Agent, kind: str, deadline: float) -> None:
        with self._cond:
            self._put(agent, kind, deadline)
            self._cond.notify()

    def clear(self, agent: Agent) -> None:
        with self._cond:
            gone = self._deadlines.pop(agent.id, None)
            if gone:
                self._live -= len(gone)

    def renew(self, agent: Agent, deadline: float) -> bool:
        """Move the lease deadline, unless the agent is already being ended.

        Under the loop's lock, so a renew racing an expiry either lands
        before it (and the agent lives) or fails (and the caller says so).
        """
        with self._cond:
            if agent.kill_requested or agent.is_ended:
                return False
            self._put(agent, "lease", deadline)
            self._cond.notify()
            return True

    def remaining(self, agent: Agent, kind: str) -> float | None:
        """Seconds left before the deadline, or None if there is none."""
        with self._cond:
            entry = self._deadlines.get(agent.id, {}).get(kind)
        return None if entry is None else entry[0] - time.monotonic()

    def _put(self, agent: Agent, kind: str, deadline: float) -> None:
        """Under the lock."""
        kinds = self._deadlines.setdefault(agent.id, {})
        if kind not in kinds:
            self._live += 1
        kinds[kind] = (deadline, agent)
        heapq.heappush(self._heap, (deadline, next(self._seq), agent.id, kind))
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [(at, next(self._seq), aid, k)
                          for aid, ks in self._deadlines.items() for k, (at, _) in ks.items()]
            heapq.heapify(self._heap)

    def _pop_expired(self, now: float) -> Expired:
        """Under the lock: remove and return every deadline at or before now."""
        expired: Expired = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, aid, kind = heapq.heappop(heap)
            kinds = self._deadlines.get(aid, {})
            entry = kinds.get(kind)
            if entry is None or entry[0] != at:
                continue  # stale: renewed or cleared since it was pushed
            del kinds[kind]
            if not kinds:
                del self._deadlines[aid]
            self._live -= 1
            expired.append((entry[1], kind, at))
        return expired

    def _next_wait(self, now: float) -> float:
        """Under the lock: seconds until the earliest live deadline, at most one tick."""
        heap = self._heap
        while heap:
            at, _, aid, kind = heap[0]
            entry = self._deadlines.get(aid, {}).get(kind)
            if entry is not None and entry[0] == at:
                return max(0.0, min(self._tick, at - now))
            heapq.heappop(heap)  # stale
        return self._tick

    # --------------------------------------------------------------- loop
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                expired = self._pop_expired(now)
                if not expired:
                    self._cond.wait(timeout=self._next_wait(now))
            if expired:
                try:
                    self._on_expired(expired)
                except Exception:
                    log.exception("acting on expired deadlines")
            self.last_tick = time.monotonic()
            self._beat()

    def _beat(self) -> None:
        # The reaper must be alive too: a daemon that can no longer notice
        # its agents' deaths is not healthy, whatever this loop does.
        reactor_age = self.last_tick - self._reactor_tick()
        if reactor_age > max(2.0, self._watchdog or 0.0):
            return
        dead = next((name for name, ok in self._liveness.items() if not _true(ok)), None)
        if dead != self._dead:
            if dead is not None:
                log.error("%s failed: no heartbeat for the watchdogs until it recovers", dead)
            else:
                log.warning("%s recovered: heartbeats resume", self._dead)
            self._dead = dead
        if dead is not None:
            return
        for fn in self._heartbeats:
            try:
                fn()
            except Exception:
                log.exception("heartbeat failed")
        if self._watchdog and self.last_tick - self._last_ping >= self._watchdog:
            sd_notify("WATCHDOG=1")
            self._last_ping = self.last_tick


def _true(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        log.exception("liveness check failed")
        return False
