"""Nothing a client can hold delays a kill (issue 10), against a real daemon.

Each test loads the daemon the way a hostile or careless client can (calls
whose request never arrives, stops in their grace period, a keyless flood,
a full disk) and then checks that a signed kill of a real agent is served
and verified empty. No test asserts a duration: each waits for an event,
with bounds generous enough for a busy 2-core machine.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from daemon.api.server import RECEIVE_DEADLINE_S
from daemon.commands.rejections import BURST
from tests.conftest import ROOT_REASON
from tests.harness import AGENT_PYTHON, Daemon, pids_in, wait_for
from tests.load import FloodProcesses, StalledCalls

pytestmark = pytest.mark.root
_names = itertools.count()
SLEEPER = ["/bin/sleep", "600"]


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def _kill_served(d: Daemon, name: str) -> agentd_pb2.KillResult:
    """Kill agent name (running); fail unless the kill is served and the cgroup is empty."""
    agent = d.get(name)
    result = d.kill(name)
    assert result.verified_empty, f"stuck: {result.stuck}"
    assert result.processes_killed >= 1
    for path in agent.cgroup_paths:
        assert pids_in(path) == [], f"{path} still has processes"
    assert d.get(name).state == agentd_pb2.AGENT_STATE_KILLED
    return result


def _ready(agent: agentd_pb2.Agent) -> None:
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 30), (
        Path(agent.stderr_log).read_text()[-500:])


# ------------------------------------------------------------ stalled calls
def test_kill_served_beside_1000_stalled_calls(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    name = _name("victim")
    d.run(name, SLEEPER)
    stalled = StalledCalls(d.socket, 1000)
    try:
        assert len(stalled.channels) >= 12  # 1000 calls need 10 connections at 100 each
        # Every call has sent its headers and holds its stream; none is over.
        assert stalled.pending() == 1000, stalled.codes()
        _kill_served(d, name)
        assert stalled.pending() == 1000, (
            "stalled calls ended before the kill was sent; the test proved nothing "
            f"(the machine is too slow for {RECEIVE_DEADLINE_S:g} s): {stalled.codes()}")
        # The server ends each of them once the receive deadline has passed.
        assert wait_for(lambda: stalled.pending() == 0, RECEIVE_DEADLINE_S * 12, 0.2), (
            f"{stalled.pending()} stalled calls still open long after the receive deadline")
        assert stalled.codes() == {grpc.StatusCode.DEADLINE_EXCEEDED: 1000}, stalled.codes()
        assert all("did not arrive" in (f.details() or "") for f in stalled.futures)
    finally:
        stalled.close()
    # The daemon still serves after them.
    again = _name("victim")
    d.run(again, SLEEPER)
    _kill_served(d, again)


# ------------------------------------------------------- stops in their grace
def test_kill_served_beside_70_stops_in_their_grace_period(fresh_daemon: Daemon,
                                                           hostile: Path) -> None:
    """70 stops wait out 300 s grace periods; a kill of another agent is served, then of them."""
    d = fresh_daemon
    stubborn = [_name("stubborn") for _ in range(70)]
    for n in stubborn:
        _ready(d.run(n, [AGENT_PYTHON, str(hostile / "ignore_term.py")]))
    victim = _name("victim")
    d.run(victim, SLEEPER)

    stops = []
    for n in stubborn:
        cmd = d.command()
        cmd.stop.name = n
        cmd.stop.grace_ms = 300_000  # the daemon's maximum
        stops.append(d.stub.Stop.future(d.sign(cmd, d.keys.oncall), timeout=600))
    assert wait_for(lambda: all(d.get(n).state == agentd_pb2.AGENT_STATE_STOPPING
                                for n in stubborn), 60, 0.2), "the stops did not all begin"
    assert not any(f.done() for f in stops), [f.exception() for f in stops if f.done()]

    _kill_served(d, victim)
    # A kill during a pending stop works too, and ends that stop.
    for n in stubborn:
        _kill_served(d, n)
    for n, f in zip(stubborn, stops, strict=True):
        result = f.result(timeout=60)
        assert result.name == n
        assert result.verified_empty, f"{n}: stuck {result.stuck}"
        assert result.state == agentd_pb2.AGENT_STATE_KILLED


# ------------------------------------------------------------ keyless flood
FLOOD_PROCESSES = 3
FLOOD_S = 6.0
FLOOD_MAX_PER_PROCESS = 50_000
# The burst of individual records (about 1.3 KiB each: eight key ids) and a
# summary or two, plus the few records of the agents' runs and kills.
FLOOD_AUDIT_BOUND = 64 * 1024


def _rejected(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in records if r["event"] == "command" and r.get("decision") == "rejected"]


def test_keyless_flood_is_refused_and_barely_audited(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    victim = _name("victim")
    d.run(victim, SLEEPER)
    before = d.audit_log.stat().st_size
    flood = FloodProcesses(d.socket, FLOOD_PROCESSES, FLOOD_S, FLOOD_MAX_PER_PROCESS)
    try:
        # Under way once the burst of individual records is spent.
        assert wait_for(lambda: len(_rejected(d.audit_records())) >= BURST, 60, 0.05), (
            "the flood never got through its burst")
        _kill_served(d, victim)
        assert all(p.poll() is None for p in flood.procs), (
            "the flood was over before the kill was sent; the test proved nothing")
        results = flood.results()
    finally:
        flood.close()
    sent = sum(r["sent"] for r in results)
    for r in results:
        assert r["codes"] == {"UNAUTHENTICATED": r["sent"]}, r
    assert sent > BURST * 2, results

    d.stop()  # closes the summary window: its record is the last refusals' account
    records = d.audit_records()
    growth = d.audit_log.stat().st_size - before
    assert growth < FLOOD_AUDIT_BOUND, (
        f"{sent} refusals grew the audit log by {growth} bytes")
    individual = [r for r in _rejected(records) if r["rpc"] == "kill"]
    assert all(r["error_reason"] == "bad_signature" for r in individual), individual[:1]
    summaries = [r for r in records if r["event"] == "commands_rejected_summary"]
    assert summaries, "no commands_rejected_summary record after the flood"
    summarized = sum(int(r["count"]) for r in summaries)  # type: ignore[call-overload]
    assert all({b["reason"] for b in r["by"]} <= {"bad_signature", "other"}  # type: ignore[attr-defined]
               for r in summaries), summaries
    # Every refusal is on record exactly once: by itself or counted in a summary.
    assert len(individual) + summarized == sent, (len(individual), summarized, sent)


# ---------------------------------------------------------------- full disk
TMPFS_SIZE = "4m"


@contextmanager
def _audit_log_on_tmpfs(dev: Path) -> Iterator[Path]:
    """Bind a file on a small tmpfs of our own at DEV/audit.log; yields the tmpfs's directory.

    The dev daemon's audit log is always DEV/audit.log (daemon.config.dev),
    so the file itself is bind-mounted there: only the audit log is on the
    small file system; the replay cache, the latch and agents' logs are not.
    """
    disk = dev.parent / "disk"
    disk.mkdir(mode=0o700)
    dev.mkdir(mode=0o750)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs",
                    str(disk)], check=True)
    try:
        (disk / "audit.log").touch(mode=0o600)
        (dev / "audit.log").touch(mode=0o600)
        subprocess.run(["mount", "--bind", str(disk / "audit.log"), str(dev / "audit.log")],
                       check=True)
        try:
            yield disk
        finally:
            subprocess.run(["umount", str(dev / "audit.log")], check=True)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fill(path: Path) -> None:
    """Write path until its file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, bytes(chunk))
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)


def _refused_for_audit(call: object, path: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert str(path) in err.value.details(), err.value.details()


def test_full_disk_kills_still_act_and_are_recorded_later(tmp_root: Path) -> None:
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    dev = tmp_root / "dev"
    with _audit_log_on_tmpfs(dev) as disk:
        d = Daemon(dev).start()
        try:
            kill_id = _full_disk(d, disk)
        finally:
            d.stop()  # and the harness checks the chain, while it is still mounted
        records = d.audit_records()
    _check_order(records, kill_id)


def _full_disk(d: Daemon, disk: Path) -> str:
    """Kill, run, estop, reset on a full disk, then free it; the kill's command id."""
    log_path = d.audit_log.resolve()
    victim, bystander = _name("victim"), _name("bystander")
    d.run(victim, SLEEPER)
    d.run(bystander, SLEEPER)
    _fill(disk / "filler")
    # A reason longer than a page: the record cannot fit in the slack of the
    # log's last page, which a full tmpfs still takes.
    kill = d.command(reason="full disk " + "x" * 8192)
    kill.kill.name = victim
    result = d.stub.Kill(d.sign(kill, d.keys.oncall), timeout=60)
    assert result.verified_empty and result.audit_pending, result
    assert pids_in(d.get(victim).cgroup_paths[0]) == []
    kill_id = kill.command_id.hex()

    _refused_for_audit(lambda: d.run(_name("refused"), SLEEPER), log_path)
    estop = d.stub.Estop(d.signed(lambda c: c.estop.SetInParent(), d.keys.oncall,
                                  reason="full disk estop " + "x" * 8192), timeout=60)
    assert estop.latched and estop.all_verified_empty and estop.audit_pending, estop
    assert estop.agents_killed == 1  # the bystander
    _refused_for_audit(lambda: d.stub.Reset(
        d.signed(lambda c: c.reset.SetInParent(), d.keys.admin), timeout=30), log_path)

    os.unlink(disk / "filler")
    # The recorder retries every half second: the kill's records reach the disk.
    assert wait_for(lambda: any(r.get("command_id") == kill_id and r["event"] == "result"
                                for r in d.audit_records()), 30), (
        "the kill's records never reached the disk once it had room")
    reset = d.stub.Reset(d.signed(lambda c: c.reset.SetInParent(), d.keys.admin), timeout=30)
    assert not reset.latched
    after = _name("after")
    d.run(after, SLEEPER)
    _kill_served(d, after)
    return kill_id


def _check_order(records: list[dict[str, object]], kill_id: str) -> None:
    """The kill's records, then the refused run's, then the estop's: in order, once each."""
    seqs = [int(r["seq"]) for r in records]  # type: ignore[call-overload]
    assert seqs == list(range(len(records)))
    kill = [r for r in records if r.get("command_id") == kill_id]
    assert [(r["event"], r.get("decision")) for r in kill] == [
        ("command", "accepted"), ("result", None)], kill
    assert kill[1]["verified_empty"] is True
    refused_run = [r for r in records if r.get("rpc") == "run"
                   and r.get("error_reason") == "audit_unavailable"]
    estop = [r for r in records if r.get("action") == "estop"]
    refused_reset = [r for r in records if r.get("rpc") == "reset"
                     and r.get("error_reason") == "audit_unavailable"]
    assert len(refused_run) == 1 and len(estop) == 2 and len(refused_reset) == 1, (
        refused_run, estop, refused_reset)
    order = [kill[0], kill[1], refused_run[0], estop[0], estop[1], refused_reset[0]]
    assert [r["seq"] for r in order] == sorted(r["seq"] for r in order), (  # type: ignore[type-var]
        [(r["event"], r.get("rpc"), r["seq"]) for r in order])
