"""The enforcement loop: lease and run-time deadlines, and the heartbeat the watchdogs watch.

Deadlines use the monotonic clock, never wall time: a clock step must not
extend or cut short a lease. The loop sleeps until the earliest deadline (or
one tick), so an expiry is acted on within a scheduler wake-up of its
deadline, not at the next poll.

Liveness: every pass records last_tick and calls the heartbeats (the
guardian's pipe). The systemd watchdog is pinged from this loop too, and
only while the reactor (output and reaping) has also ticked recently: a
stalled enforcement loop, or a stalled reaper, stops the pings even if other
threads still run (sd_watchdog_enabled(3), systemd.service(5) WatchdogSec=).
"""

from __future__ import annotations

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
        # (agent id, kind) -> (monotonic deadline, agent)
        self._deadlines: dict[tuple[str, str], tuple[float, Agent]] = {}
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
            self._deadlines[(agent.id, kind)] = (deadline, agent)
            self._cond.notify()

    def clear(self, agent: Agent) -> None:
        with self._cond:
            for key in [k for k in self._deadlines if k[0] == agent.id]:
                del self._deadlines[key]

    def renew(self, agent: Agent, deadline: float) -> bool:
        """Move the lease deadline, unless the agent is already being ended.

        Under the loop's lock, so a renew racing an expiry either lands
        before it (and the agent lives) or fails (and the caller says so).
        """
        with self._cond:
            if agent.kill_requested or agent.is_ended:
                return False
            self._deadlines[(agent.id, "lease")] = (deadline, agent)
            self._cond.notify()
            return True

    def remaining(self, agent: Agent, kind: str) -> float | None:
        """Seconds left before the deadline, or None if there is none."""
        with self._cond:
            entry = self._deadlines.get((agent.id, kind))
        return None if entry is None else entry[0] - time.monotonic()

    # --------------------------------------------------------------- loop
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                expired: Expired = []
                for key, (at, agent) in list(self._deadlines.items()):
                    if at <= now:
                        del self._deadlines[key]
                        expired.append((agent, key[1], at))
                if not expired:
                    nxt = min((at for at, _ in self._deadlines.values()), default=now + self._tick)
                    self._cond.wait(timeout=max(0.0, min(self._tick, nxt - now)))
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
