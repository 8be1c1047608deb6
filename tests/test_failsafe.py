"""Fail closed: leases, run-time limits, the emergency stop and its latch, reset quorum."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd import signing
from agentd.v1 import agentd_pb2

from tests.harness import AGENT_PYTHON, SANDBOX_PROCS, Daemon, alive, pids_in, wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def quorum_daemon() -> Iterator[Daemon]:
    """A daemon that needs two distinct principals to reset, and leases on every run."""
    from tests.conftest import ROOT_REASON

    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    root = Path(tempfile.mkdtemp(prefix="agentd-t-"))
    d = Daemon(root / "dev", config="reset_signatures = 2\nrequire_lease = true\n").start()
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _ready(agent: agentd_pb2.Agent) -> bool:
    return wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)


def _events(d: Daemon, event: str) -> list[dict[str, object]]:
    return [r for r in d.audit_records() if r["event"] == event]


def _renew(d: Daemon, name: str, ttl_ms: int, key: object = None) -> agentd_pb2.LeaseResult:
    def fill(c: agentd_pb2.Command) -> None:
        c.renew.name = name
        c.renew.ttl_ms = ttl_ms

    result: agentd_pb2.LeaseResult = d.stub.Renew(
        d.signed(fill, key or d.keys.supervisor), timeout=10)  # type: ignore[arg-type]
    return result


# ------------------------------------------------------------------ leases
def test_unrenewed_lease_hard_kills_the_whole_tree(daemon: Daemon, hostile: Path) -> None:
    agent = daemon.run(f"leased-{daemon.mode}", [AGENT_PYTHON, str(hostile / "daemonize.py")],
                       lease_ms=800)
    assert _ready(agent)
    members = pids_in(agent.cgroup_paths[0])
    assert len(members) == 2 + SANDBOX_PROCS
    status = daemon.get(agent.name)
    assert status.lease_ttl_ms == 800 and 0 < status.lease_remaining_ms <= 800
    assert wait_for(lambda: daemon.get(agent.name).state == agentd_pb2.AGENT_STATE_KILLED, 10)
    assert [p for p in members if alive(p)] == []
    assert daemon.get(agent.name).end_reason == "lease_expired"
    assert wait_for(lambda: any(r["agent_id"] == agent.id
                                for r in _events(daemon, "lease_expired")), 5)
    record = next(r for r in _events(daemon, "lease_expired") if r["agent_id"] == agent.id)
    assert record["verified_empty"] is True


def test_signed_renewals_keep_an_agent_alive_until_they_stop(daemon: Daemon,
                                                             hostile: Path) -> None:
    name = f"kept-{daemon.mode}"
    agent = daemon.run(name, [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=700)
    assert _ready(agent)
    for _ in range(6):  # 6 x 250 ms: well past the first deadline
        result = _renew(daemon, name, 700)
        assert result.ttl_ms == 700 and result.remaining_ms > 600
        time.sleep(0.25)
    assert daemon.get(name).state == agentd_pb2.AGENT_STATE_RUNNING
    # Renewals stop: the lease runs out and the agent is killed.
    assert wait_for(lambda: daemon.get(name).state == agentd_pb2.AGENT_STATE_KILLED, 15)
    assert not alive(agent.main_pid)
    with pytest.raises(grpc.RpcError) as exc:
        _renew(daemon, name, 700)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot bring it back" in (exc.value.details() or "")


def test_who_may_renew(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    d.run("renewable", [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=30_000)
    # oncall may stop and kill, not renew; supervisor may renew and stop, not run.
    with pytest.raises(grpc.RpcError) as exc:
        _renew(d, "renewable", 30_000, d.keys.oncall)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _renew(d, "renewable", 30_000, d.keys.supervisor)
    _renew(d, "renewable", 30_000, d.keys.operator)
    with pytest.raises(grpc.RpcError) as exc:
        d.run("not-by-supervisor", ["/bin/true"], key=d.keys.supervisor)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    result = d.stop_agent("renewable", grace_ms=100, key=d.keys.supervisor)
    assert result.verified_empty


def test_max_runtime_stops_the_agent(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    agent = d.run("bounded", ["/bin/sleep", "1000"], max_runtime_ms=500)
    assert wait_for(lambda: d.get("bounded").state == agentd_pb2.AGENT_STATE_KILLED, 10)
    assert not alive(agent.main_pid)
    assert d.get("bounded").end_reason == "max_runtime"
    assert wait_for(lambda: bool(_events(d, "max_runtime_reached")), 15)
    # sleep ends on SIGTERM, and its sandbox (bwrap's two processes) with it.
    assert _events(d, "max_runtime_reached")[0]["terminated_by_sigterm"] == 1 + SANDBOX_PROCS


def test_required_lease(quorum_daemon: Daemon) -> None:
    d = quorum_daemon
    with pytest.raises(grpc.RpcError) as exc:
        d.run("no-lease", ["/bin/sleep", "1000"])
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lease" in (exc.value.details() or "")
    d.run("with-lease", ["/bin/sleep", "1000"], lease_ms=10_000)
    d.kill("with-lease")


# --------------------------------------------------------------- estop
def _estop(d: Daemon, key: object = None) -> agentd_pb2.EstopResult:
    result: agentd_pb2.EstopResult = d.stub.Estop(
        d.signed(lambda c: c.estop.SetInParent(), key or d.keys.oncall,  # type: ignore[arg-type]
                 reason="agent threatened staff"), timeout=60)
    return result


def _reset_env(d: Daemon, *keys: object) -> agentd_pb2.Envelope:
    env = d.signed(lambda c: c.reset.SetInParent(), keys[0])  # type: ignore[arg-type]
    for k in keys[1:]:
        env = signing.cosign(env, k)  # type: ignore[arg-type]
    return env


def test_estop_kills_everything_and_latches_across_restarts(quorum_daemon: Daemon,
                                                            hostile: Path) -> None:
    d = quorum_daemon
    agents = [d.run(f"fleet-{i}", [AGENT_PYTHON, str(hostile / "daemonize.py")],
                    lease_ms=60_000) for i in range(3)]
    assert all(_ready(a) for a in agents)
    members = [p for a in agents for p in pids_in(a.cgroup_paths[0])]
    result = _estop(d)
    assert result.latched and result.all_verified_empty
    assert result.agents_killed == 3 and result.processes_killed == 3 * (2 + SANDBOX_PROCS)
    assert [p for p in members if alive(p)] == []
    assert all(d.get(a.name).end_reason == "estop" for a in agents)

    with pytest.raises(grpc.RpcError) as exc:
        d.run("after-estop", ["/bin/sleep", "1000"], lease_ms=10_000)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "latched" in (exc.value.details() or "")

    # The latch survives a restart.
    d.stop()
    d.start()
    assert d.stub.Info(agentd_pb2.InfoRequest(), timeout=30).estop_latched
    with pytest.raises(grpc.RpcError):
        d.run("after-restart", ["/bin/sleep", "1000"], lease_ms=10_000)

    # One principal is not enough, nor is the same key twice, nor a role that may not reset.
    for keys in ((d.keys.admin,), (d.keys.admin, d.keys.oncall)):
        with pytest.raises(grpc.RpcError) as exc:
            d.stub.Reset(_reset_env(d, *keys), timeout=10)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, keys
        assert "2 distinct principals" in (exc.value.details() or "")
    doubled = _reset_env(d, d.keys.admin)
    doubled.signatures.append(doubled.signatures[0])
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Reset(doubled, timeout=10)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert d.stub.Info(agentd_pb2.InfoRequest(), timeout=30).estop_latched

    reset = d.stub.Reset(_reset_env(d, d.keys.admin, d.keys.admin2), timeout=10)
    assert not reset.latched and list(reset.principals) == ["admin", "admin2"]
    # Reset restarts nothing: no agent runs, none of the old processes is back.
    listed = d.stub.ListAgents(agentd_pb2.ListAgentsRequest(), timeout=30).agents
    assert [a.name for a in listed if a.state == agentd_pb2.AGENT_STATE_RUNNING] == []
    assert [p for p in members if alive(p)] == []
    d.run("after-reset", ["/bin/sleep", "1000"], lease_ms=10_000)
    d.kill("after-reset")


def test_estop_with_nothing_running_still_latches(fresh_daemon: Daemon) -> None:
    result = _estop(fresh_daemon)
    assert result.latched and result.agents_killed == 0
    info = fresh_daemon.stub.Info(agentd_pb2.InfoRequest(), timeout=30)
    assert info.estop_latched and "agent threatened staff" in info.latch_reason


# ------------------------------------------------------------------ CLI
def _agentctl_argv(d: Daemon, key: str, *args: str) -> list[str]:
    keyfile = d.dir.parent / f"{key}.key"
    if not keyfile.exists():
        from cryptography.hazmat.primitives import serialization

        keyfile.write_bytes(getattr(d.keys, key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        keyfile.chmod(0o600)
    return [sys.executable, "-m", "agentctl", "--socket", str(d.socket), "--key", str(keyfile),
            *args]


def _agentctl(d: Daemon, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_agentctl_argv(d, key, *args), capture_output=True, text=True,
                          timeout=60)


def test_cli_keepalive_estop_cosign_reset(quorum_daemon: Daemon, hostile: Path) -> None:
    d = quorum_daemon
    d.run("held", [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=1000)
    out = _agentctl(d, "supervisor", "keepalive", "held", "--every", "300ms", "--ttl", "1s",
                    "--count", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("renewed 'held'") == 4
    assert d.get("held").state == agentd_pb2.AGENT_STATE_RUNNING

    out = _agentctl(d, "oncall", "--json", "estop", "--reason", "drill")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["agents_killed"] == 1
    out = _agentctl(d, "supervisor", "keepalive", "held", "--every", "300ms", "--ttl", "1s")
    assert out.returncode == 11, out.stderr
    assert "RENEWAL REFUSED" in out.stderr
    out = _agentctl(d, "operator", "run", "--name", "x", "--lease", "5s", "--", "/bin/true")
    assert out.returncode == 6 and "latched" in out.stderr

    env_file = d.dir.parent / "reset.env"
    out = _agentctl(d, "admin", "reset", "--sign-only")
    assert out.returncode == 0, out.stderr
    env_file.write_text(out.stdout)
    out = _agentctl(d, "admin", "send", str(env_file))
    assert out.returncode == 4 and "2 distinct principals" in out.stderr
    out = _agentctl(d, "admin2", "cosign", str(env_file))
    assert out.returncode == 0 and "reset" in out.stderr, out.stderr
    # A refused command changed nothing, not even the replay cache: the same
    # command, now with its second signature, goes through.
    out = _agentctl(d, "admin", "send", str(env_file))
    assert out.returncode == 0, out.stderr
    assert "cleared" in out.stdout


# ------------------------------------------------------ commands that name a run
def _pinned(d: Daemon, action: str, name: str, run_id: str, key: object,
            **fields: int) -> agentd_pb2.Envelope:
    """A command for one run of name (its id), signed now, to be sent later."""
    def fill(c: agentd_pb2.Command) -> None:
        body = getattr(c, action)
        body.name, body.id = name, run_id
        for k, v in fields.items():
            setattr(body, k, v)

    return d.signed(fill, key)  # type: ignore[arg-type]


def _refusals(d: Daemon, run_id: str) -> list[dict[str, object]]:
    return [r for r in _events(d, "command") if r["decision"] == "rejected"
            and r.get("error_reason") == "wrong_run" and run_id in str(r["error"])]


def test_a_command_for_an_ended_run_never_touches_the_next(daemon: Daemon,
                                                           hostile: Path) -> None:
    d, name = daemon, f"rerun-{daemon.mode}"
    a = d.run(name, [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=60_000)
    assert _ready(a)
    # Signed while run A is current (a --sign-only envelope, a keepalive's next renew).
    for_a = {
        "kill": (d.stub.Kill, _pinned(d, "kill", name, a.id, d.keys.oncall)),
        "renew": (d.stub.Renew, _pinned(d, "renew", name, a.id, d.keys.supervisor,
                                        ttl_ms=3_600_000)),
        "thaw": (d.stub.Thaw, _pinned(d, "thaw", name, a.id, d.keys.operator)),
        "stop": (d.stub.Stop, _pinned(d, "stop", name, a.id, d.keys.oncall)),
    }
    d.kill(name)
    # Ended, not yet replaced: the id still names the current (ended) run.
    again = d.stub.Kill(_pinned(d, "kill", name, a.id, d.keys.oncall), timeout=30)
    assert again.id == a.id and again.already_ended

    b = d.run(name, [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=60_000)
    assert _ready(b) and b.id != a.id
    frozen = d.stub.Freeze(_pinned(d, "freeze", name, b.id, d.keys.oncall), timeout=30)
    assert frozen.state == agentd_pb2.AGENT_STATE_FROZEN
    members = pids_in(b.cgroup_paths[0])

    for action, (rpc, env) in for_a.items():
        with pytest.raises(grpc.RpcError) as exc:
            rpc(env, timeout=30)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, action
        details = exc.value.details() or ""
        assert f"agent {name!r} is now run {b.id} (frozen, started at " in details, details
        assert f"not {a.id!r}, which this command names; that run ended at " in details
        assert "re-sign for the current run" in details
        # B untouched: the same processes, still frozen, its lease as it was.
        now = d.get(name)
        assert now.id == b.id and now.state == agentd_pb2.AGENT_STATE_FROZEN, action
        assert now.lease_ttl_ms == 60_000 and now.lease_remaining_ms <= 60_000, action
        assert pids_in(b.cgroup_paths[0]) == members and all(alive(p) for p in members)
    assert wait_for(lambda: len(_refusals(d, a.id)) == len(for_a), 10), _refusals(d, a.id)
    assert [r["rpc"] for r in _refusals(d, a.id)] == list(for_a)
    assert all(r["error_code"] == "FAILED_PRECONDITION" for r in _refusals(d, a.id))

    # A run is named by its agent's name and its id, never by the id alone.
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Kill(_pinned(d, "kill", "", b.id, d.keys.oncall), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a run is named by both" in (exc.value.details() or "")
    # A run this daemon never had is refused the same way.
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Kill(_pinned(d, "kill", name, f"{name}-00000000", d.keys.oncall), timeout=30)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"this daemon knows no run '{name}-00000000'" in (exc.value.details() or "")

    # The same commands signed for B's id act on B.
    thawed = d.stub.Thaw(_pinned(d, "thaw", name, b.id, d.keys.operator), timeout=30)
    assert thawed.state == agentd_pb2.AGENT_STATE_RUNNING
    renewed = d.stub.Renew(_pinned(d, "renew", name, b.id, d.keys.supervisor,
                                   ttl_ms=120_000), timeout=30)
    assert renewed.id == b.id and d.get(name).lease_ttl_ms == 120_000
    killed = d.stub.Kill(_pinned(d, "kill", name, b.id, d.keys.oncall), timeout=30)
    assert killed.id == b.id and killed.verified_empty and not killed.already_ended
    assert [p for p in members if alive(p)] == []


def test_keepalive_exits_11_when_its_run_is_replaced(daemon: Daemon, hostile: Path) -> None:
    d, name = daemon, f"kept-run-{daemon.mode}"
    a = d.run(name, [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=60_000)
    loop = subprocess.Popen(
        _agentctl_argv(d, "supervisor", "keepalive", name, "--every", "3s", "--ttl", "30s"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def renewed(agent_id: str) -> bool:
        return any(r["decision"] == "accepted" and r["action"] == "renew"
                   and r.get("agent_id") == agent_id for r in _events(d, "command"))

    try:
        assert loop.stdout is not None
        # A renewal has come back (click flushes each line); the loop now sleeps
        # --every. Paused while A is replaced, so its next renewal is the first
        # B could get, and no renewal of A is in flight across the pause.
        first = loop.stdout.readline()
        assert first.startswith(f"renewed '{name}' (run {a.id})"), first
        loop.send_signal(signal.SIGSTOP)
        d.kill(name)
        b = d.run(name, [AGENT_PYTHON, str(hostile / "ignore_term.py")], lease_ms=60_000)
        assert _ready(b)
        loop.send_signal(signal.SIGCONT)
        out, err = loop.communicate(timeout=60)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.communicate()
    assert loop.returncode == 11, (out, err)
    assert f"RENEWAL REFUSED for '{name}' (run {a.id})" in err, err
    assert f"is now run {b.id}" in err, err
    # B was never renewed by the loop: its lease is the one it started with.
    assert not renewed(b.id)
    now = d.get(name)
    assert now.id == b.id and now.state == agentd_pb2.AGENT_STATE_RUNNING
    assert now.lease_ttl_ms == 60_000
    assert wait_for(lambda: len(_refusals(d, a.id)) == 1, 10)
    d.kill(name)


def test_an_estop_racing_a_launch_leaves_no_agent_alive(fresh_daemon: Daemon) -> None:
    """Estops sent at staggered moments after a run: whichever side wins, nothing survives.

    Before the run is admitted, the latch refuses it; while it starts, the
    launch sees the latch and kills its own agent (it was not in the estop's
    snapshot); once it runs, the estop kills it. Each attempt ends with every
    run of the name ended and its cgroup empty.
    """
    d = fresh_daemon
    outcomes: list[str] = []
    for i, delay in enumerate([0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08]):
        name = f"race-{i}"
        run_result: list[object] = []
        runner = threading.Thread(
            target=lambda n=name, out=run_result: out.append(_try_run(d, n)))
        runner.start()
        time.sleep(delay)
        _estop(d)
        runner.join(60)
        assert not runner.is_alive()
        (res,) = run_result
        if isinstance(res, grpc.RpcError):
            details = res.details() or ""
            outcomes.append("killed while starting" if "while the agent was starting" in details
                            else "refused")
            assert res.code() == grpc.StatusCode.FAILED_PRECONDITION, details
        else:
            outcomes.append("killed by the estop")
        listed = [a for a in d.stub.ListAgents(agentd_pb2.ListAgentsRequest(), timeout=30).agents
                  if a.name == name]
        for a in listed:
            assert wait_for(lambda n=a.name: d.get(n).state in (
                agentd_pb2.AGENT_STATE_KILLED, agentd_pb2.AGENT_STATE_EXITED), 30), a
            assert all(pids_in(p) == [] for p in a.cgroup_paths if Path(p).exists())
        d.stub.Reset(_reset_env(d, d.keys.admin), timeout=30)
    print("estop vs launch:", outcomes)


def _try_run(d: Daemon, name: str) -> object:
    try:
        return d.run(name, ["/bin/sleep", "1000"])
    except grpc.RpcError as err:
        return err
