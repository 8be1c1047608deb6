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

Quiet agents: a sample starts with the agent cgroup's cpu.stat usage_usec
(one pread(2) of a held handle; none at all when the agents' whole subtree,
whose cpu.stat is hierarchical, used no CPU since the last sweep began). If
it has not moved since the last full sample, no process of the agent has run
since (the kernel charges every fork, exec, open, socket call and exit to
the cgroup's CPU time), so its processes, executables, fds, sockets and
files cannot have changed: the sample carries the last full one's detail
forward with fresh times, rates and cpu_percent 0, and reads nothing else.
What may change without the agent running is refreshed every refresh_s (10 s
by default, spread over agents): memory_bytes (the kernel reclaims pages, or
charges received network buffers), oom_kills, and the members (a process an
administrator moved in), from the cgroup's own files; an agent holding
sockets (whose peers may close or reset connections) or whose members
changed is then sampled in full. An agent that runs anything is sampled in
full in that same sweep, so every signal tripwire acts as fast as before. A
burst of less than a microsecond of CPU would go unseen until the next one
or the refresh; no fork, exec or socket call is that short.

Cost: a full sample reads cgroup.procs, cpu.stat and the memory files and,
per process, its exe link and every fd link (fdinfo only for files outside
the allowed prefixes), plus the TCP/UDP tables once per network namespace
whose processes hold sockets (reading /proc/net/tcp walks the kernel's whole
established hash: about 1 ms on a host with 256K buckets, whatever the
number of sockets). A quiet sample reads one file (about 7 us of the sampler
thread per agent); a refresh three. Measured (benchmarks/sampler_cost.py,
benchmarks/idle_scale.py, 2 vCPUs): see CHANGELOG.md and the benchmarks'
tables; 1,000 idle sandboxed agents cost the whole daemon about 2.5 % of a
core, most of it this thread. An agent at its limits (pids.max processes
each holding nofile fds) that keeps running can stretch a sweep to seconds:
sampling then runs less often, and nothing else waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
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
# How often a quiet agent (no CPU used since its last full sample) is still
# sampled in full, for what changes without it running (module docstring).
QUIET_REFRESH_S = 10.0

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


def _settled(agent: Agent) -> bool:
    """Whether agent's installed signals stay true while nothing of it runs.

    Its rates and CPU share read 0 (a sample after activity still shows it:
    that one is replaced by a quiet sample first), and agentd's proxy has
    counted nothing new for it since.
    """
    last = agent.signals
    if last.cpu_percent or last.processes_per_second or any(last.process_rates.values()):
        return False
    e = agent.egress
    return e is None or (e.denied, e.bytes_total, e.flows_open) == (
        last.egress_denied, last.egress_bytes, last.egress_flows_open)


@dataclass
class _Track:
    """What the sampler remembers of one agent between samples."""

    # Members at the last sample: pid -> the executable it ran then.
    members: dict[int, str | None] = field(default_factory=dict)
    started: int = 0
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_COMMANDS))
    # Command lines of the pids first seen by the last full sample, read again
    # by the next one (a fork caught before its exec).
    first_lines: dict[int, str] = field(default_factory=dict)
    cpu_usec: int | None = None
    at: float | None = None  # monotonic time of the last sample
    # processes_started at each sample, for rates over whole windows.
    starts: CountHistory | None = None
    # The last full sample, carried forward while the agent is quiet, and
    # when (monotonic) a quiet agent is next sampled in full all the same.
    full: Signals | None = None
    refresh_at: float = 0.0
    swept: int = -1  # the sweep that last read cpu_usec
    # Wall time of the idle sweep that last skipped it (its signals held then).
    verified_at: float = 0.0


class Sampler:
    """Samples every running agent each interval_s seconds (0: never) on its own thread.

    allowed_prefixes: where agents may write without it being reported
    (files_written); a comma-separated string or an iterable of absolute paths.
    kill_gate: the reactor's lock held by a burst of kills; while it is held
    the sweep stops early, so sampling never competes with a mass kill.
    refresh_s: how often a quiet agent is sampled in full all the same
    (module docstring); 0 samples every agent in full every time.
    """

    def __init__(self, sup: AgentSource, interval_s: float = 1.0,
                 allowed_prefixes: str | Iterable[str] = DEFAULT_ALLOWED_PREFIXES, *,
                 kill_gate: _Gate | None = None,
                 refresh_s: float = QUIET_REFRESH_S) -> None:
        self._sup = sup
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        if isinstance(allowed_prefixes, str):
            allowed_prefixes = parse_prefixes(allowed_prefixes)
        self.allowed = procfs.Prefixes(allowed_prefixes)
        self._kill_gate = kill_gate
        self._listeners: list[Listener] = []
        self._tracks: dict[str, _Track] = {}
        # Windows (seconds) over which processes_per_second is measured; the
        # first is the one Signals.processes_per_second reports.
        self._windows: tuple[float, ...] = (MIN_WINDOW_S,)
        # Shared by every sample whose rates are all 0 (never changed: samples are not).
        self._zero_rates = dict.fromkeys(self._windows, 0.0)
        self._sweeps = 0  # sweeps begun
        # The agents' subtree's CPU time when the last sweep began.
        self._subtree_usec: int | None = None
        # Wall time of the newest sweep that found the subtree idle: every
        # agent it skipped was verified unchanged then.
        self._quiet_at = 0.0
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
        self._zero_rates = dict.fromkeys(self._windows, 0.0)

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
        idle = self._subtree_idle(running)
        self._sweeps += 1
        if idle:
            self._quiet_at = time.time()
        for agent in running:
            if self._kill_gate is not None and self._kill_gate.locked():
                break
            try:
                new = self.sample(agent, nets, idle=idle)
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

    def sampled_at(self, agent: Agent) -> float:
        """When agent's signals were last verified: its own sample, or an idle sweep's start.

        A sweep that finds the agents' subtree idle skips agents read by the
        sweep before it (nothing of theirs can have changed); their signals
        are then as of that sweep's start, which this reports.
        """
        track = self._tracks.get(agent.id)
        own = agent.signals.sampled_at
        if track is not None and own:
            return max(own, track.verified_at)
        return own

    def _subtree_idle(self, running: list[Agent]) -> bool:
        """Whether no agent has run since the last sweep began (the agents' subtree's CPU time).

        Then every agent's usage_usec is what that sweep read, and quiet
        agents need not be read one by one: 1,000 idle agents cost one read.
        """
        trees = {id(a.cgroup.tree): a.cgroup.tree for a in running}
        if len(trees) != 1:
            return False
        try:
            usec = next(iter(trees.values())).cpu_usage_usec()
        except CgroupError:
            return False
        idle = usec == self._subtree_usec
        self._subtree_usec = usec
        return idle

    def sample(self, agent: Agent, nets: dict[str, dict[int, procfs.NetEntry]] | None = None,
               *, idle: bool = False) -> Signals | None:
        """Build agent's new Signals and install it; None if the agent ended meanwhile.

        nets caches /proc/PID/net tables by network namespace within one sweep.
        idle: no agent has run since the last sweep began (_subtree_idle).
        Called on the sampler thread only (it updates what is remembered of
        the agent). Raises CgroupError if the agent's cgroup cannot be read.
        """
        if nets is None:
            nets = {}
        track = self._tracks.setdefault(agent.id, _Track())
        group = agent.cgroup
        now_wall, now = time.time(), time.monotonic()
        if (idle and track.swept == self._sweeps - 1 and track.full is not None
                and now < track.refresh_at and _settled(agent)):
            # Nothing of the subtree ran since the last sweep read this agent:
            # its signals stand as they are, verified at this sweep's start
            # (sampled_at()). 1,000 idle agents then cost one read a second.
            track.swept, track.verified_at = self._sweeps, self._quiet_at
            return None
        # Unchanged since the last sweep read it, if the whole subtree was idle.
        if idle and track.swept == self._sweeps - 1 and track.cpu_usec is not None:
            cpu_usec = track.cpu_usec
        else:
            cpu_usec = group.cpu_usage_usec()
        track.swept = self._sweeps
        pids: list[int] | None = None
        if track.full is not None and cpu_usec == track.cpu_usec:
            if now < track.refresh_at:
                return self._install(agent, self._quiet(agent, track, now_wall, now))
            # Due for a refresh. Without sockets, and with the same members,
            # only the cgroup's own counters can have moved.
            pids = group.pids()
            if not track.full.sockets_open and track.members.keys() == set(pids):
                new = self._quiet(agent, track, now_wall, now)
                new.memory_bytes, new.oom_kills = group.memory_bytes(), group.oom_kills()
                track.full = new
                self._schedule_refresh(agent, track, now)
                return self._install(agent, new)
        if pids is None:
            pids = group.pids()
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
        # A child caught between fork(2) and an execve(2) of the same binary
        # (python3 -c ...) showed its parent's command line, and the exe
        # comparison above cannot see that exec: each command line is read
        # once more at the next full sample, and kept if it changed.
        for pid, line in track.first_lines.items():
            if pid in members and pid not in fresh:
                now_line = procfs.cmdline(pid)
                if now_line and now_line != line:
                    track.recent.append(now_line)
        first_lines: dict[int, str] = {}
        for pid in fresh[-RECENT_COMMANDS:]:
            line = procfs.cmdline(pid)
            if line:
                track.recent.append(line)
                first_lines[pid] = line
        track.first_lines = first_lines

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
        rates = self._rates(agent, track, now_wall, now)

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
        track.full = new
        self._schedule_refresh(agent, track, now)
        return self._install(agent, new)

    def _schedule_refresh(self, agent: Agent, track: _Track, now: float) -> None:
        # Spread over agents, so that agents sampled first together (a
        # daemon's start) are not all refreshed in the same sweep.
        spread = (zlib.crc32(agent.id.encode()) & 0xFF) / 0x200  # [0, 0.5)
        track.refresh_at = now + self.refresh_s * (1 - spread)

    def _rates(self, agent: Agent, track: _Track, now_wall: float, now: float
               ) -> dict[float, float]:
        """Record processes_started now; its rate over each window (daemon.monitor.rates)."""
        if track.starts is None:
            # The launch, on the monotonic clock: when the count was 0.
            born = min(now, now - (now_wall - agent.started_at))
            track.starts = CountHistory(born, keep_s=max(self._windows))
        track.starts.add(now, track.started)
        if track.starts.flat():
            return self._zero_rates  # most agents, most of the time: skip the arithmetic
        return {w: track.starts.rate(w) for w in self._windows}

    def _quiet(self, agent: Agent, track: _Track, now_wall: float, now: float) -> Signals:
        """The last full sample's detail with fresh times and rates: nothing ran since."""
        assert track.full is not None
        track.at = now  # cpu_usec is unchanged: the next window starts here
        rates = self._rates(agent, track, now_wall, now)
        # A shallow copy, not dataclasses.replace or copy.copy (each a third
        # of a quiet sample's cost): samples are never changed once
        # installed, but for tripwire_hits, so their lists may be shared.
        new = Signals.__new__(Signals)
        new.__dict__.update(track.full.__dict__)
        new.sampled_at, new.uptime_s = now_wall, max(0.0, now_wall - agent.started_at)
        new.processes_per_second, new.process_rates = rates[self._windows[0]], rates
        new.cpu_percent, new.new_executables = 0.0, []
        return new

    @staticmethod
    def _install(agent: Agent, new: Signals) -> Signals | None:
        """Make new the agent's signals, unless it ended meanwhile (then None)."""
        with agent.lock:
            # An agent that ended meanwhile keeps its last full sample, not
            # one taken from a half-removed cgroup.
            if agent.is_ended:
                return None
            # Tripwire hits are counted elsewhere, under this lock.
            new.tripwire_hits = agent.signals.tripwire_hits
            # Egress: what agentd's own proxy counted (never the agent).
            egress = agent.egress
            if egress is not None:
                new.egress_denied, new.egress_bytes = egress.denied, egress.bytes_total
                new.egress_flows_open = egress.flows_open
            agent.signals = new
        return new
