"""Every bad command is refused with a precise status, touches no agent, and is audited."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from agentd import signing
from agentd.v1 import agentd_pb2

from tests.harness import AGENT_PYTHON, Daemon, alive, code_binds, pids_in, wait_for

pytestmark = pytest.mark.root
_n = itertools.count()


@pytest.fixture(scope="module")
def victim_daemon(daemon: Daemon, hostile: Path) -> tuple[Daemon, agentd_pb2.Agent]:
    """One long-lived agent that every refused command aims at."""
    name = f"victim-{next(_n)}"
    agent = daemon.run(name, [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)
    return daemon, agent


def _kill_cmd(d: Daemon, name: str, **kw: object) -> agentd_pb2.Command:
    cmd = d.command(**kw)  # type: ignore[arg-type]
    cmd.kill.name = name
    return cmd


def _signed(d: Daemon, cmd: agentd_pb2.Command, key: object = None) -> agentd_pb2.Envelope:
    return signing.sign_command(cmd, key or d.keys.oncall)  # type: ignore[arg-type]


def _flip_payload_byte(env: agentd_pb2.Envelope) -> agentd_pb2.Envelope:
    payload = bytearray(env.payload)
    payload[-1] ^= 0x01
    env.payload = bytes(payload)
    return env


def _unsigned(env: agentd_pb2.Envelope) -> agentd_pb2.Envelope:
    del env.signatures[:]
    return env


def _bad_sig(env: agentd_pb2.Envelope) -> agentd_pb2.Envelope:
    sig = bytearray(env.signatures[0].sig)
    sig[5] ^= 0xFF
    env.signatures[0].sig = bytes(sig)
    return env


def _oversized(env: agentd_pb2.Envelope) -> agentd_pb2.Envelope:
    env.payload = env.payload + b"\0" * 70000
    return env


Case = Callable[[Daemon, str], agentd_pb2.Envelope]

CASES: dict[str, tuple[Case, grpc.StatusCode, str]] = {
    "unsigned": (lambda d, n: _unsigned(_signed(d, _kill_cmd(d, n))),
                 grpc.StatusCode.UNAUTHENTICATED, "not signed"),
    "bad-signature": (lambda d, n: _bad_sig(_signed(d, _kill_cmd(d, n))),
                      grpc.StatusCode.UNAUTHENTICATED, "no signature verifies"),
    "unknown-key": (lambda d, n: _signed(d, _kill_cmd(d, n), d.keys.stranger),
                    grpc.StatusCode.UNAUTHENTICATED, "trust store"),
    "expired": (lambda d, n: _signed(d, _kill_cmd(d, n, now=time.time() - 3600)),
                grpc.StatusCode.UNAUTHENTICATED, "expired"),
    "future-dated": (lambda d, n: _signed(d, _kill_cmd(d, n, now=time.time() + 3600)),
                     grpc.StatusCode.UNAUTHENTICATED, "clock"),
    "wrong-audience": (lambda d, n: _signed(d, _kill_cmd(d, n, audience="some-other-host")),
                       grpc.StatusCode.UNAUTHENTICATED, "some-other-host"),
    "payload-byte-changed": (lambda d, n: _flip_payload_byte(_signed(d, _kill_cmd(d, n))),
                             grpc.StatusCode.UNAUTHENTICATED, "no signature verifies"),
    "oversized": (lambda d, n: _oversized(_signed(d, _kill_cmd(d, n))),
                  grpc.StatusCode.INVALID_ARGUMENT, "65536"),
    "too-long-lifetime": (lambda d, n: _signed(d, _kill_cmd(d, n, lifetime=3600)),
                          grpc.StatusCode.INVALID_ARGUMENT, "lifetime"),
}


def _rejected_records(d: Daemon) -> list[dict[str, object]]:
    return [r for r in d.audit_records()
            if r["event"] == "command" and r["decision"] == "rejected"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_kill_touches_nothing(victim_daemon: tuple[Daemon, agentd_pb2.Agent],
                                      case: str) -> None:
    d, agent = victim_daemon
    make, code, words = CASES[case]
    before = pids_in(agent.cgroup_paths[0])
    audited = len(_rejected_records(d))
    env = make(d, agent.name)
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Kill(env, timeout=10)
    assert exc.value.code() == code, exc.value.details()
    assert words.lower() in (exc.value.details() or "").lower(), exc.value.details()
    # Untouched: the same processes, alive, still running.
    assert pids_in(agent.cgroup_paths[0]) == before
    assert all(alive(p) for p in before)
    assert d.get(agent.name).state == agentd_pb2.AGENT_STATE_RUNNING
    records = _rejected_records(d)
    assert len(records) == audited + 1
    assert records[-1]["error_code"] == code.name
    assert records[-1]["payload_sha256"]


def test_role_not_allowed(victim_daemon: tuple[Daemon, agentd_pb2.Agent],
                          hostile: Path) -> None:
    """oncall may stop and kill but not run."""
    d, _ = victim_daemon
    cmd = d.command()
    cmd.run.name = f"not-allowed-{next(_n)}"
    cmd.run.argv.extend([AGENT_PYTHON, str(hostile / "ignore_term.py")])
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Run(signing.sign_command(cmd, d.keys.oncall), timeout=10)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "oncall" in (exc.value.details() or "")
    assert all(a.name != cmd.run.name for a in d.stub.ListAgents(
        agentd_pb2.ListAgentsRequest(), timeout=5).agents)
    assert _rejected_records(d)[-1]["error_code"] == "PERMISSION_DENIED"


def test_command_sent_to_the_wrong_rpc(victim_daemon: tuple[Daemon, agentd_pb2.Agent]) -> None:
    d, agent = victim_daemon
    env = _signed(d, _kill_cmd(d, agent.name))
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Stop(env, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert d.get(agent.name).state == agentd_pb2.AGENT_STATE_RUNNING


def test_replayed_command_is_refused(victim_daemon: tuple[Daemon, agentd_pb2.Agent],
                                     hostile: Path) -> None:
    d, _ = victim_daemon
    name = f"replay-{next(_n)}"
    cmd = d.command()
    cmd.run.name = name
    cmd.run.argv.extend([AGENT_PYTHON, str(hostile / "ignore_term.py")])
    # Its code, bound as the harness's run() binds it: without it the agent
    # exits at once (no such file), and a kill racing that exit finds it ended.
    cmd.run.overrides.bind_ro.extend(code_binds(list(cmd.run.argv)))
    env = signing.sign_command(cmd, d.keys.operator)
    agent = d.stub.Run(env, timeout=30)
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)
    d.kill(name)
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Run(env, timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already" in (exc.value.details() or "")
    assert d.get(name).state == agentd_pb2.AGENT_STATE_KILLED


def test_replay_refused_after_restart(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    agent = d.run("survivor", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    kill_env = _signed(d, _kill_cmd(d, "survivor"))
    d.stub.Kill(kill_env, timeout=30)
    assert pids_in(agent.cgroup_paths[0]) == []
    d.stop()
    d.start()
    # Same name again; the old kill must not be replayable against it.
    again = d.run("survivor", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    assert wait_for(lambda: "ready" in Path(again.stdout_log).read_text(), 15)
    with pytest.raises(grpc.RpcError) as exc:
        d.stub.Kill(kill_env, timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Refused as a replay, not for any other reason UNAUTHENTICATED stands for.
    command_id = agentd_pb2.Command.FromString(kill_env.payload).command_id.hex()
    assert exc.value.details() == (f"command {command_id} was already accepted; replays are "
                                   "refused — sign a new command"), exc.value.details()
    assert _rejected_records(d)[-1]["error_reason"] == "replayed"
    assert d.get("survivor").state == agentd_pb2.AGENT_STATE_RUNNING
    d.kill("survivor")


def test_lost_replay_cache_refuses_run_but_not_kill(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    agent = d.run("before-loss", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 15)
    d.stop()  # kills the agent; start it again after the restart
    (d.dir / "state" / "replay.jsonl").write_text("{not json\n")
    d.start()
    info = d.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
    assert info.HasField("replay_degraded_until")
    with pytest.raises(grpc.RpcError) as exc:
        d.run("after-loss", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stop, kill and estop" in (exc.value.details() or "")


def test_estop_works_while_the_replay_cache_is_degraded(tmp_root: Path, hostile: Path) -> None:
    """The stop path stays open while runs (and resets) wait out the window.

    No agent can be running while the cache is degraded: the window starts
    when the daemon opens the cache, every agent of the earlier run was
    killed at its start, and runs are refused until the window ends. So the
    stop action that can act here is an estop; it must be accepted and latch.
    """
    # A window of lifetime 10 s + skew 5 s, so the test can outwait it.
    d = Daemon(tmp_root / "dev", config="max_command_lifetime_s = 10\nclock_skew_s = 5\n")
    d.start()
    try:
        d.stop()
        (d.dir / "state" / "replay.jsonl").write_text("{not json\n")
        d.start()
        info = d.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
        assert info.HasField("replay_degraded_until")
        until = info.replay_degraded_until.ToDatetime().timestamp()

        estop = d.stub.Estop(d.signed(lambda c: c.estop.SetInParent(), d.keys.oncall,
                                      lifetime=10, reason="degraded"), timeout=60)
        assert estop.latched and estop.agents_killed == 0
        accepted = [r for r in d.audit_records()
                    if r["event"] == "command" and r["decision"] == "accepted"]
        assert [r["action"] for r in accepted] == ["estop"]
        # Audited (after it was admitted) inside the degraded window: the degraded branch ran.
        assert datetime.fromisoformat(str(accepted[0]["ts"])).timestamp() < until
        assert d.stub.Info(agentd_pb2.InfoRequest(), timeout=5).estop_latched

        # A reset is not a stop: it waits out the window like a run.
        def reset() -> agentd_pb2.ResetResult:
            result: agentd_pb2.ResetResult = d.stub.Reset(
                d.signed(lambda c: c.reset.SetInParent(), d.keys.admin, lifetime=10),
                timeout=10)
            return result

        with pytest.raises(grpc.RpcError) as exc:
            reset()
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stop, kill and estop" in (exc.value.details() or "")
        assert wait_for(lambda: not d.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
                        .HasField("replay_degraded_until"), 60, interval=0.5)
        assert not reset().latched

        # Once the window is over and the latch reset, a real agent runs and is killed.
        def fill(cmd: agentd_pb2.Command) -> None:
            cmd.run.name = "after-window"
            cmd.run.argv.extend([AGENT_PYTHON, str(hostile / "ignore_term.py")])
            cmd.run.overrides.bind_ro.extend(code_binds(list(cmd.run.argv)))

        agent = d.stub.Run(d.signed(fill, d.keys.operator, lifetime=10), timeout=30)
        killed = d.stub.Kill(_signed(d, _kill_cmd(d, "after-window", lifetime=10)), timeout=30)
        assert killed.verified_empty
        assert pids_in(agent.cgroup_paths[0]) == []
    finally:
        d.stop()


def test_edited_trust_store_is_picked_up(fresh_daemon: Daemon, hostile: Path) -> None:
    d = fresh_daemon
    ts = d.dir / "trusted_keys"
    new_key_line = signing.public_key_line(d.keys.stranger, "late@test")
    with pytest.raises(grpc.RpcError):
        d.run("late", [AGENT_PYTHON, str(hostile / "ignore_term.py")], key=d.keys.stranger)
    ts.write_text(ts.read_text() + f"late operator {new_key_line}\n")
    agent = d.run("late", [AGENT_PYTHON, str(hostile / "ignore_term.py")], key=d.keys.stranger)
    assert agent.started_by == "late"
    # A malformed edit: everything that starts or loosens is refused (fail
    # closed) and the error names the line...
    ts.write_text(ts.read_text() + "garbage line\n")
    with pytest.raises(grpc.RpcError) as exc:
        d.run("later", [AGENT_PYTHON, str(hostile / "ignore_term.py")])
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "line" in (exc.value.details() or "")
    # ...but a broken edit never takes away a kill: the last good store serves
    # stops, and the audit log says so.
    assert d.kill("late").verified_empty
    assert wait_for(lambda: [r for r in d.audit_records()
                             if r["event"] == "trust_store_fallback" and r["rpc"] == "kill"], 30)
    ts.write_text(d.keys.trust_store())


def test_running_daemon_prunes_its_replay_cache(tmp_root: Path, hostile: Path) -> None:
    """Expired entries leave the file without a restart: it does not grow for months."""
    # A short window (lifetime 4 s + skew 2 s) so entries expire within the test.
    d = Daemon(tmp_root / "dev", config="max_command_lifetime_s = 4\nclock_skew_s = 2\n")
    d.start()
    try:
        replay = d.dir / "state" / "replay.jsonl"

        def entries() -> int:
            return len(replay.read_text().splitlines()) - 1

        def fill(cmd: agentd_pb2.Command) -> None:
            cmd.run.name = "short-lived"
            cmd.run.argv.extend([AGENT_PYTHON, str(hostile / "ignore_term.py")])
            cmd.run.overrides.bind_ro.extend(code_binds(list(cmd.run.argv)))

        d.stub.Run(d.signed(fill, d.keys.operator, lifetime=4), timeout=30)
        kill = _kill_cmd(d, "short-lived", lifetime=4)
        assert d.stub.Kill(_signed(d, kill), timeout=30).verified_empty
        assert entries() == 2
        # Kept until expiry + window, dropped at the next prune (every window).
        assert wait_for(lambda: entries() == 0, 90, interval=0.5), replay.read_text()
        assert d.proc is not None and d.proc.poll() is None  # no restart
    finally:
        d.stop()
