"""The sampler: every period, what the kernel says each running agent is doing.

One thread ("agentd-sampler"). For each running agent it builds a fresh
Signals from cgroupfs (through the agent's AgentCgroup) and /proc (through
daemon.monitor.procfs) and replaces ``agent.signals`` with it in one
assignment, so readers (the API, tripwire rules) never see a half-filled
sample. Nothing comes from the agent's own reporting.

What sampling cannot see: a process that starts and exits between two
samples is not counted in processes_started nor in recent_commands (its CPU
time still shows in cpu.stat); a connection attempt that fails or closes
within a period, and a file opened and closed within one, leave no trace.
The kernel's process connector (netlink NETLINK_CONNECTOR, CN_IDX_PROC)
would report every fork and exec as it happens, but it is host-wide (the
daemon would wake for every fork on the host), its socket drops events under
a fork storm (ENOBUFS), and a short-lived process must be mapped to its
cgroup after it may already have gone; it is left for later.

Cost: a sweep reads a few cgroup files per agent and, per process, its exe
link and every fd link (fdinfo only for files outside the allowed prefixes),
plus the TCP/UDP tables once per network namespace (reading /proc/net/tcp
walks the kernel's whole established hash: about 1 ms on a host with 256K
buckets, whatever the number of sockets). Measured (benchmarks/sampler_cost.py,
2 vCPUs): 100 agents of 3 processes each about 20 ms, of 10 processes each
about 45 ms. An agent at its limits (pids.max processes each holding nofile
fds) can stretch a sweep to seconds: sampling then runs less often, and
nothing else waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from daemon.errors import CgroupError
from daemon.monitor import procfs
from daemon.monitor.model import Signals
from daemon.monitor.rates import MIN_WINDOW_S, CountHistory

if TYPE_CHECKING:
    from daemon.supervisor.agent import Agent

log = logging.getLogger(__name__)

RECENT_COMMANDS = 10
FILES_WRITTEN_MAX = 20
REMOTE_ADDRESSES_MAX = 20
DEFAULT_ALLOWED_PREFIXES = ("/tmp", "/var/tmp", "/dev")

Listener = Callable[["Agent", Signals], None]


class _Gate(Protocol):
    """The reactor's kill gate, as the sampler sees it."""

    def locked(self) -> bool: ...


class AgentSource(Protocol):
    """What the sampler needs of the supervisor."""

    def running(self) -> list[Agent]: ...


def parse_prefixes(text: str) -> tuple[str, ...]:
    """ "/tmp, /var/tmp,/dev" -> ("/tmp", "/var/tmp", "/dev"). Raises ValueError if relative."""
    out = tuple(p.strip().rstrip("/") or "/" for p in text.split(",") if p.strip())
    for p in out:
        if not p.startswith("/"):
            raise ValueError(f"{p!r} is not an absolute path")
    return out


@dataclass
class _Track:
    """What the sampler remembers of one agent between samples."""

    # Members at the last sample: pid -> the executable it ran then.
    members: dict[int, str | None] = field(default_factory=dict)
    started: int = 0
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_COMMANDS))
    cpu_usec: int | None = None
    at: float | None = None  # monotonic time of the last sample
    # processes_started at each sample, for rates over whole windows.
    starts: CountHistory | None = None


class Sampler:
    """Samples every running agent each interval_s seconds (0: never) on its own thread.

    allowed_prefixes: where agents may write without it being reported
    (files_written); a comma-separated string or an iterable of absolute paths.
    kill_gate: the reactor's lock held by a burst of kills; while it is held
    the sweep stops early, so sampling never competes with a mass kill.
    """

    def __init__(self, sup: AgentSource, interval_s: float = 1.0,
                 allowed_prefixes: str | Iterable[str] = DEFAULT_ALLOWED_PREFIXES, *,
                 kill_gate: _Gate | None = None) -> None:
        self._sup = sup
        self.interval_s = interval_s
        if isinstance(allowed_prefixes, str):
            allowed_prefixes = parse_prefixes(allowed_prefixes)
        self.allowed = procfs.Prefixes(allowed_prefixes)
        self._kill_gate = kill_gate
        self._listeners: list[Listener] = []
        self._tracks: dict[str, _Track] = {}
        # Windows (seconds) over which processes_per_second is measured; the
        # first is the one Signals.processes_per_second reports.
        self._windows: tuple[float, ...] = (MIN_WINDOW_S,)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentd-sampler", daemon=True)
        self.last_sweep_s = 0.0  # how long the last sweep took

    # ------------------------------------------------------------ control
    def add_listener(self, fn: Listener) -> None:
        """Call fn(agent, signals) on the sampler thread after each agent's sample.

        A listener's exception is logged and never stops sampling. Listeners
        run in the sampling loop: a slow one delays the next samples.
        """
        self._listeners.append(fn)

    def measure_rates_over(self, windows: Iterable[float]) -> None:
        """Also measure processes per second over these windows (tripwire rules' own).

        Call before start(); each window is at least rates.MIN_WINDOW_S.
        """
        extra = sorted({float(w) for w in windows} - set(self._windows))
        if any(w < MIN_WINDOW_S for w in extra):
            raise ValueError(f"a rate window is at least {MIN_WINDOW_S:g} s")
        self._windows = (*self._windows, *extra)

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        # Fixed rate on the monotonic clock; a sweep that overruns its period
        # skips the missed ticks rather than running back to back.
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("sampling agents")
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)

    # ----------------------------------------------------------- sampling
    def sweep(self) -> None:
        """Sample every running agent once (the loop's body; callable from tests)."""
        t0 = time.monotonic()
        running = [a for a in self._sup.running() if not a.kill_requested]
        # Agents gone since the last sweep take their memory with them.
        live = {a.id for a in running}
        for gone in self._tracks.keys() - live:
            del self._tracks[gone]
        nets: dict[str, dict[int, procfs.NetEntry]] = {}
        for agent in running:
            if self._kill_gate is not None and self._kill_gate.locked():
                break
            try:
                new = self.sample(agent, nets)
            except CgroupError:
                # The agent ended and its cgroup was removed mid-sample.
                continue
            if new is None:
                continue
            for fn in self._listeners:
                try:
                    fn(agent, new)
                except Exception:
                    log.exception("signals listener %r failed on agent %s", fn, agent.id)
        self.last_sweep_s = time.monotonic() - t0

    def sample(self, agent: Agent,
               nets: dict[str, dict[int, procfs.NetEntry]] | None = None) -> Signals | None:
        """Build agent's new Signals and install it; None if the agent ended meanwhile.

        nets caches /proc/PID/net tables by network namespace within one sweep.
        Called on the sampler thread only (it updates what is remembered of
        the agent). Raises CgroupError if the agent's cgroup cannot be read.
        """
        if nets is None:
            nets = {}
        track = self._tracks.setdefault(agent.id, _Track())
        group = agent.cgroup
        now_wall, now = time.time(), time.monotonic()
        pids = group.pids()
        cpu_usec = group.cpu_usage_usec()
        window = now - track.at if track.at is not None else None

        new_execs: dict[str, None] = {}  # ordered, without repeats
        started = 0
        fresh: list[int] = []  # pids started or exec'd since the last sample
        members: dict[int, str | None] = {}
        # Socket inodes by network namespace: a process may have unshared its own.
        sockets: dict[str, set[int]] = {}
        all_sockets: set[int] = set()  # sockfs inode numbers are unique host-wide
        written: dict[str, None] = {}
        # bwrap's own processes are the sandbox's, not the agent's: they are
        # not counted as started, nor their executable as one the agent ran.
        # Known by pid, from the launch (never by name: an agent may exec bwrap).
        helpers = agent.helper_pids
        for pid in pids:
            exe = procfs.exe(pid)
            members[pid] = exe
            is_new = pid not in track.members
            # A known pid whose executable changed has called execve(2).
            execed = not is_new and exe is not None and track.members[pid] not in (None, exe)
            if (is_new or execed) and pid not in helpers:
                started += is_new
                fresh.append(pid)
                if exe is not None:
                    new_execs[exe] = None
            held = procfs.fds(pid, self.allowed)
            if held.sockets:
                ns = procfs.netns(pid)
                if ns is not None:
                    if ns not in nets:
                        nets[ns] = procfs.net_tables(pid)
                    sockets.setdefault(ns, set()).update(held.sockets)
                all_sockets |= held.sockets
            if len(written) < FILES_WRITTEN_MAX:
                written.update(dict.fromkeys(held.written))
        # Only the last few command lines are kept: under a fork storm, read no more.
        for pid in fresh[-RECENT_COMMANDS:]:
            line = procfs.cmdline(pid)
            if line:
                track.recent.append(line)

        conns, remotes = 0, set[str]()
        for ns, inodes in sockets.items():
            n, addrs = procfs.connections(nets[ns], inodes)
            conns += n
            remotes.update(addrs)
        if window is None:
            # First sample: rates since the launch.
            window = max(1e-3, now_wall - agent.started_at)
            cpu_window_usec = cpu_usec
        else:
            window = max(1e-3, window)
            cpu_window_usec = cpu_usec - (track.cpu_usec or 0)
        track.members = members
        track.started += started
        track.cpu_usec, track.at = cpu_usec, now
        if track.starts is None:
            # The launch, on the monotonic clock: when the count was 0.
            born = min(now, now - (now_wall - agent.started_at))
            track.starts = CountHistory(born, keep_s=max(self._windows))
        track.starts.add(now, track.started)
        rates = {w: track.starts.rate(w) for w in self._windows}

        new = Signals(
            sampled_at=now_wall,
            uptime_s=max(0.0, now_wall - agent.started_at),
            processes_started=track.started,
            processes_per_second=rates[self._windows[0]],
            process_rates=rates,
            recent_commands=list(track.recent),
            cpu_seconds=cpu_usec / 1e6,
            cpu_percent=max(0.0, cpu_window_usec / 1e6 / window * 100),
            memory_bytes=group.memory_bytes(),
            pids=len(pids),
            sockets_open=len(all_sockets),
            connections=conns,
            remote_addresses=sorted(remotes)[:REMOTE_ADDRESSES_MAX],
            files_written=list(written)[:FILES_WRITTEN_MAX],
            oom_kills=group.oom_kills(),
            new_executables=list(new_execs),
        )
        with agent.lock:
            # An agent that ended meanwhile keeps its last full sample, not
            # one taken from a half-removed cgroup.
            if agent.is_ended:
                return None
            # Tripwire hits are counted elsewhere, under this lock.
            new.tripwire_hits = agent.signals.tripwire_hits
            agent.signals = new
        return new
