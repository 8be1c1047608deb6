"""The sampler against real cgroups and processes, without a daemon.

End-to-end tests through the daemon and agentctl live in test_signals.py;
these drive daemon.monitor.sampler.Sampler directly, for what is hard to
arrange through the API: an execve in a known pid, processes vanishing
mid-sample, listener failures, and the hand-over of tripwire hits.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.monitor.model import Signals
from tests.harness import REPO, wait_for
from tests.scratch_agents import ScratchAgent, ScratchAgents

pytestmark = pytest.mark.root

PY = sys.executable


@pytest.fixture
def scratch() -> Iterator[ScratchAgents]:
    from tests.conftest import ROOT_REASON

    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    s = ScratchAgents()
    yield s
    s.close()


def _sample_until(scratch: ScratchAgents, agent: ScratchAgent, cond: object,
                  timeout: float = 10.0) -> Signals:
    sampler = scratch.sampler()

    def ok() -> bool:
        sampler.sweep()
        return bool(cond(agent.signals))  # type: ignore[operator]

    assert wait_for(ok, timeout, interval=0.05), agent.signals
    return agent.signals


def test_an_exec_in_a_known_pid_is_seen(scratch: ScratchAgents) -> None:
    """A process that was sampled, then called execve(2): a new executable, not a new process."""
    agent = scratch.spawn(["/bin/sh", "-c", "sleep 0.6; exec /bin/sleep 30"], name="execer")
    sampler = scratch.sampler()
    sampler.sweep()
    first = agent.signals
    assert first.processes_started >= 1
    main = agent.proc.pid
    # Wait for the exec; the shell's own sleep child comes and goes meanwhile.
    assert wait_for(lambda: (sampler.sweep(), "/bin/sleep 30" in agent.signals.recent_commands)[1],
                    10, interval=0.05), agent.signals
    # Seen in the same pid, through /proc/PID/exe, in the sample that found it.
    assert agent.signals.new_executables == ["/usr/bin/sleep"]
    assert agent.cgroup.pids() == [main]


def test_counts_children_and_their_command_lines(scratch: ScratchAgents) -> None:
    agent = scratch.spawn(
        [PY, str(REPO / "tests" / "hostile" / "spawn_children.py"), "4"], name="kids")
    # A sample may catch a child between its fork and its exec (the parent's
    # command line then): the sampler reads it again at the next full sample.
    s = _sample_until(scratch, agent, lambda s: s.pids >= 5 and all(
        any(f"signals-child-{i}" in c for c in s.recent_commands) for i in range(4)))
    assert s.processes_started >= 5
    assert s.processes_per_second > 0
    for i in range(4):
        assert any(f"signals-child-{i}" in c for c in s.recent_commands), s.recent_commands


def test_processes_vanishing_mid_sample_are_tolerated(scratch: ScratchAgents) -> None:
    """A fork storm: pids listed in cgroup.procs are gone by the time /proc is read."""
    agent = scratch.spawn([PY, str(REPO / "tests" / "hostile" / "fork_storm.py")], name="storm")
    sampler = scratch.sampler()
    deadline = time.monotonic() + 2
    sweeps = 0
    while time.monotonic() < deadline:
        sampler.sweep()  # raises on any unexpected /proc error
        sweeps += 1
    assert agent.signals.processes_started > 1
    assert agent.signals.cpu_seconds > 0
    assert sweeps > 5


def test_signals_are_replaced_whole_and_tripwire_hits_carried(scratch: ScratchAgents) -> None:
    agent = scratch.spawn(["/bin/sleep", "30"], name="still")
    sampler = scratch.sampler()
    sampler.sweep()
    old = agent.signals
    with agent.lock:
        agent.signals.tripwire_hits = 3  # what the tripwire rules do, under the lock
    sampler.sweep()
    new = agent.signals
    assert new is not old
    assert new.tripwire_hits == 3
    assert new.sampled_at >= old.sampled_at
    assert new.pids == 1
    assert new.processes_started == old.processes_started == 1


def test_agents_being_killed_or_ended_are_not_sampled(scratch: ScratchAgents) -> None:
    agent = scratch.spawn(["/bin/sleep", "30"], name="dying")
    sampler = scratch.sampler()
    agent.kill_requested = True
    sampler.sweep()
    assert agent.signals.sampled_at == 0.0
    agent.kill_requested = False
    agent.is_ended = True
    assert sampler.sample(agent) is None
    assert agent.signals.sampled_at == 0.0


def test_a_failing_listener_never_stops_sampling(scratch: ScratchAgents,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    scratch.spawn(["/bin/sleep", "30"], name="listened")
    sampler = scratch.sampler(interval_s=0.05)
    seen: list[Signals] = []

    def broken(a: object, s: Signals) -> None:
        raise RuntimeError("rule bug")

    sampler.add_listener(broken)  # type: ignore[arg-type]
    sampler.add_listener(lambda a, s: seen.append(s))
    with caplog.at_level(logging.ERROR, logger="daemon.monitor.sampler"):
        sampler.start()
        try:
            assert wait_for(lambda: len(seen) >= 3, 10)
        finally:
            sampler.stop()
    assert all(s.pids == 1 and s.processes_started == 1 for s in seen)
    assert "rule bug" in caplog.text
    assert not sampler._thread.is_alive()


def test_sockets_files_and_cpu(scratch: ScratchAgents, tmp_path: Path) -> None:
    """A root process here, so the written file may be anywhere the test owns."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(10)
        port = listener.getsockname()[1]
        out = tmp_path / "written.txt"
        code = (
            "import socket, time\n"
            f"c = socket.create_connection(('127.0.0.1', {port}))\n"
            f"f = open({str(out)!r}, 'w')\n"
            "end = time.monotonic() + 30\n"
            "while time.monotonic() < end: pass\n"
        )
        agent = scratch.spawn([PY, "-c", code], name="busy")
        conn, _ = listener.accept()
        with conn:
            # tmp_path lives under /tmp: allow nothing, so it counts as outside.
            sampler = scratch.sampler(allowed="/dev")

            def seen() -> bool:
                sampler.sweep()
                return bool(agent.signals.connections and agent.signals.files_written
                            and agent.signals.cpu_percent > 50)

            assert wait_for(seen, 15, interval=0.2), agent.signals
    s = agent.signals
    assert f"127.0.0.1:{port}" in s.remote_addresses
    assert str(out) in s.files_written
    assert s.sockets_open >= 1
    assert s.uptime_s > 0


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def test_a_quiet_agent_costs_one_read_and_is_refreshed(scratch: ScratchAgents,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No CPU used since the last full sample: no /proc read, until a refresh finds a new pid."""
    import subprocess

    from daemon.monitor import procfs

    agent = scratch.spawn(["/bin/sleep", "30"], name="quiet")
    sampler = scratch.sampler()
    # The shell's exec of sleep may still be running, and on a loaded machine
    # a window without CPU does not prove it done: first the kernel must show
    # it asleep in nanosleep (wchan), then a sample must be quiet.
    assert wait_for(lambda: "nanosleep" in _wchan(agent.proc.pid), 10, interval=0.02)
    assert wait_for(lambda: (sampler.sweep(), agent.signals.cpu_percent == 0.0)[1], 10,
                    interval=0.05), agent.signals
    full = agent.signals
    reads: list[int] = []
    real_exe = procfs.exe
    monkeypatch.setattr(procfs, "exe", lambda pid: reads.append(pid) or real_exe(pid))
    time.sleep(0.05)
    sampler.sweep()
    quiet = agent.signals
    assert reads == []
    assert quiet is not full and quiet.sampled_at > full.sampled_at
    assert (quiet.pids, quiet.processes_started, quiet.cpu_seconds) == (
        full.pids, full.processes_started, full.cpu_seconds)
    assert quiet.new_executables == []
    # A refresh with the same members reads the cgroup's counters only.
    sampler._tracks[agent.id].refresh_at = 0.0
    sampler.sweep()
    assert reads == []
    # A process moved in from outside has not run in the cgroup: only a
    # refresh can see it, and then it is sampled in full.
    outsider = subprocess.Popen(["/bin/sleep", "30"])
    try:
        time.sleep(0.1)  # let it reach its sleep before it is moved
        (agent.cgroup.v2 / "cgroup.procs").write_text(str(outsider.pid))
        sampler.sweep()
        assert agent.signals.pids == 1
        sampler._tracks[agent.id].refresh_at = 0.0
        sampler.sweep()
        assert agent.signals.pids == 2
        assert agent.signals.processes_started == full.processes_started + 1
        assert outsider.pid in reads
    finally:
        outsider.kill()
        outsider.wait()


def test_a_known_process_that_wakes_is_sampled_in_full_at_once(scratch: ScratchAgents) -> None:
    """Sockets opened by a pid sampled quiet before are seen at the next sweep after."""
    code = ("import socket, time\n"
            "time.sleep(1.5)\n"
            "s = [socket.socket() for _ in range(3)]\n"
            "time.sleep(30)\n")
    agent = scratch.spawn([PY, "-c", code], name="waker")
    sampler = scratch.sampler()
    sampler.refresh_s = 1e6  # only the agent's own CPU time may bring a full sample
    quiet_seen = False

    def seen() -> bool:
        nonlocal quiet_seen
        sampler.sweep()
        s = agent.signals
        quiet_seen |= s.cpu_percent == 0.0 and s.sockets_open == 0 and s.pids == 1
        return s.sockets_open == 3

    assert wait_for(seen, 10, interval=0.05), agent.signals
    assert quiet_seen


def test_an_idle_subtree_costs_one_read(scratch: ScratchAgents,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No agent ran since the last sweep: no agent's cpu.stat is read; one that runs is seen."""
    from daemon.cgroups.tree import AgentCgroup

    sleeper = scratch.spawn(["/bin/sleep", "30"], name="idle")
    code = "import socket, time\ntime.sleep(1.5)\ns = socket.socket()\ntime.sleep(30)\n"
    waker = scratch.spawn([PY, "-c", code], name="waker")
    sampler = scratch.sampler()
    sampler.refresh_s = 1e6
    reads: list[str] = []
    real = AgentCgroup.cpu_usage_usec

    def counted(self: AgentCgroup) -> int:
        reads.append(self.agent_id)
        return real(self)

    monkeypatch.setattr(AgentCgroup, "cpu_usage_usec", counted)
    idle_sweeps = 0

    def seen() -> bool:
        nonlocal idle_sweeps
        del reads[:]
        sampler.sweep()
        idle_sweeps += not reads
        return waker.signals.sockets_open == 1

    assert wait_for(seen, 10, interval=0.05), waker.signals
    assert idle_sweeps > 0
    assert sleeper.signals.pids == 1 and sleeper.signals.sockets_open == 0


def test_an_idle_subtree_leaves_settled_signals_and_says_when_it_verified_them(
        scratch: ScratchAgents) -> None:
    """A sweep of an idle subtree installs nothing new for a settled agent, yet vouches for it."""
    sleeper = scratch.spawn(["/bin/sleep", "30"], name="settled")
    sampler = scratch.sampler()
    sampler.refresh_s = 1e6
    # Until the signals settle (a quiet sample replaced the first, whose CPU
    # share and rates reflect the start-up), sweeps install new ones.
    assert wait_for(lambda: (sampler.sweep(), sleeper.signals.sampled_at != 0
                             and sleeper.signals.cpu_percent == 0)[1], 10, interval=0.05)
    skipped = False

    def skip_seen() -> bool:
        nonlocal skipped
        before = sleeper.signals
        sampler.sweep()
        skipped = sleeper.signals is before
        return skipped

    assert wait_for(skip_seen, 10, interval=0.05), "no sweep ever skipped the settled agent"
    assert sampler.sampled_at(sleeper) > sleeper.signals.sampled_at
    assert sleeper.signals.pids == 1


def test_a_fork_caught_before_its_exec_gets_its_own_command_line(
        scratch: ScratchAgents, tmp_path: Path) -> None:
    """The child runs the same binary before and after execve(2): the exe cannot tell."""
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            f"    while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "    os.execv(sys.executable, [sys.executable, '-c', "
            "'import time; time.sleep(30)', 'after-exec-marker'])\n"
            "time.sleep(30)\n")
    agent = scratch.spawn([PY, "-c", code], name="forker")
    sampler = scratch.sampler()
    # The child exists, still the parent's program.
    assert wait_for(lambda: (sampler.sweep(), agent.signals.pids >= 2)[1], 10, interval=0.05)
    assert not any("after-exec-marker" in c for c in agent.signals.recent_commands)
    go.touch()
    assert wait_for(lambda: (sampler.sweep(), any(
        "after-exec-marker" in c for c in agent.signals.recent_commands))[1], 10,
        interval=0.05), agent.signals.recent_commands
