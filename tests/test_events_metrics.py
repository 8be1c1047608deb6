"""Events, metrics, health and reflection against a real daemon.

Each daemon serves metrics on a loopback port the test picked (or a Unix
socket); every stream a test opens is cancelled and every agent killed
before the test ends. The bus, the metric counting and journald detection
have unit tests in tests/unit/test_events.py.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from agentctl.cli import cli
from daemon.api.servicer import MAX_EVENT_STREAMS
from tests.conftest import ROOT_REASON
from tests.harness import REPO, Daemon, wait_for

pytestmark = pytest.mark.root

SLEEPER = ["/usr/bin/sleep", "600"]
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(config: str) -> Iterator[Daemon]:
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    root = Path(tempfile.mkdtemp(prefix="agentd-t-"))
    d = Daemon(root / "dev", config=config).start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def daemon(port: int) -> Iterator[Daemon]:
    """One daemon for the module, metrics on a loopback port."""
    yield from _start(f'metrics_listen = "127.0.0.1:{port}"\n')


@pytest.fixture
def own_daemon() -> Iterator[Daemon]:
    """A daemon of its own, for tests that count streams or stop it."""
    yield from _start("")


class Follower:
    """An Events stream read by a thread into a list, until cancelled."""

    def __init__(self, d: Daemon, *, backlog: int = 0, agent: str = "") -> None:
        assert d.channel is not None
        self.call = d.stub.Events(agentd_pb2.EventsRequest(follow=True, backlog=backlog,
                                                           agent=agent))
        self.events: list[agentd_pb2.Event] = []
        self.error: grpc.RpcError | None = None
        self.ended_cleanly = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self.call:
                self.events.append(ev)
            self.ended_cleanly = True
        except grpc.RpcError as err:
            self.error = err

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


def _run_and_kill(d: Daemon, name: str) -> agentd_pb2.KillResult:
    d.run(name, SLEEPER)
    result = d.kill(name)
    assert result.verified_empty
    return result


def _scrape_http(port: int) -> Metrics:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/plain")
        return _parse(resp.read().decode())
    finally:
        conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(self._path))


def _scrape_unix(path: Path) -> Metrics:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        return _parse(resp.read().decode())
    finally:
        conn.close()


def _parse(text: str) -> Metrics:
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _bad_signature_kill(d: Daemon, name: str) -> str:
    """Send a kill whose signature is garbage; return the reason the daemon audited."""
    cmd = d.command()
    cmd.kill.name = name
    env = d.sign(cmd, d.keys.oncall)
    env.signatures[0].sig = bytes(64)
    with pytest.raises(grpc.RpcError) as err:
        d.stub.Kill(env, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rejected = [r for r in d.audit_records()
                if r["event"] == "command" and r.get("decision") == "rejected"]
    return str(rejected[-1]["error_reason"])


def _action(e: agentd_pb2.Event) -> str:
    """The command an event belongs to: rpc or action, "run" for a run's result."""
    fields = json.loads(e.fields_json)
    if e.type == "result" and "main_pid" in fields:
        return "run"
    return str(fields.get("rpc") or fields.get("action") or "")


# ------------------------------------------------------------------ events
def test_backlog_holds_daemon_start(daemon: Daemon) -> None:
    got = list(daemon.stub.Events(agentd_pb2.EventsRequest(backlog=1000), timeout=10))
    start = next(e for e in got if e.type == "daemon_start")
    assert start.kind == "lifecycle"
    assert start.message.startswith("agentd ")
    assert json.loads(start.fields_json)["pid"] == daemon.pid
    assert [e.seq for e in got] == sorted(e.seq for e in got)
    # No follow, no backlog: an empty stream that ends at once.
    assert list(daemon.stub.Events(agentd_pb2.EventsRequest(), timeout=10)) == []


def test_follower_sees_an_agent_from_run_to_end(daemon: Daemon) -> None:
    name = "evt-life"
    # backlog: whatever happens for this agent before the stream is set up
    # is still delivered, so the test does not race its own follower.
    f = Follower(daemon, backlog=1000, agent=name)
    try:
        _run_and_kill(daemon, name)
        # Both: agent_ended (the main process's end) and the kill's result
        # (recorded after the act, on the recorder thread) come in either order.
        assert wait_for(lambda: "agent_ended" in f.types() and any(
            e.type == "result" and _action(e) == "kill" for e in f.events), timeout=10), f.types()
    finally:
        f.close()
    assert f.error is None or f.error.code() == grpc.StatusCode.CANCELLED
    ev = {(e.type, _action(e)): i for i, e in enumerate(f.events)}
    # The kill's audit records and agent_ended come from two threads after the
    # kill; only the order within each is fixed.
    assert ev[("command", "run")] < ev[("result", "run")] < ev[("command", "kill")]
    assert ev[("command", "kill")] < ev[("result", "kill")]
    assert ev[("result", "run")] < ev[("agent_ended", "")]
    assert all(e.agent == name for e in f.events)
    by_type = {e.type: e for e in f.events}
    assert by_type["agent_ended"].kind == "lifecycle"
    assert by_type["agent_ended"].message.startswith(f"{name} ended: killed")
    assert by_type["result"].agent_id.startswith(name + "-")
    seqs = [e.seq for e in f.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_events_cli_text_and_json(daemon: Daemon) -> None:
    reasons = [_bad_signature_kill(daemon, "evt-cli") for _ in range(3)]
    runner = CliRunner()
    text = runner.invoke(cli, ["--socket", str(daemon.socket), "events", "--backlog", "3"])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert len(lines) == 3
    for line, reason in zip(lines, reasons, strict=True):
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  command   rejected kill: "
                        + reason + ": ", line), line
    out = runner.invoke(cli, ["--socket", str(daemon.socket), "events", "--json",
                              "--backlog", "1000"])
    assert out.exit_code == 0, out.output
    objs = [json.loads(line) for line in out.output.splitlines()]
    start = next(o for o in objs if o["type"] == "daemon_start")
    assert start["fields"]["event"] == "daemon_start"
    assert set(start) >= {"seq", "at", "kind", "type", "agent", "agent_id", "message"}
    assert isinstance(start["seq"], int)


def test_events_follow_ends_with_130_on_ctrl_c(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentctl", "--socket", str(daemon.socket), "events", "-f",
         "--json", "--backlog", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the backlog event arrives
        assert json.loads(first)["seq"] > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "agentctl: error: interrupted"
    for line in out.splitlines():
        json.loads(line)


def test_followers_beyond_the_cap_are_refused_and_kill_stays_instant(
    own_daemon: Daemon,
) -> None:
    d = own_daemon
    followers: list[Follower] = []
    try:
        for _ in range(MAX_EVENT_STREAMS):
            followers.append(Follower(d, backlog=1))
        # Each has its slot once its first (backlog) event arrived.
        assert wait_for(lambda: all(f.events for f in followers), timeout=20)
        extra = d.stub.Events(agentd_pb2.EventsRequest(follow=True), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(extra)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {MAX_EVENT_STREAMS} event streams" in (err.value.details() or "")
        # A Kill is not queued behind the followers, who never end: one that
        # were would never be answered (the RPC's own deadline would fail it).
        d.run("evt-cap", SLEEPER)
        result = d.kill("evt-cap")
        assert result.verified_empty
        # Every follower heard about it.
        assert wait_for(lambda: all("agent_ended" in f.types() for f in followers), timeout=10)
    finally:
        for f in followers:
            f.close()
    # Their slots come back once they are gone.

    def accepted() -> bool:
        one = d.stub.Events(agentd_pb2.EventsRequest(follow=True, backlog=1), timeout=10)
        try:
            next(one)
            return True
        except grpc.RpcError:
            return False
        finally:
            one.cancel()

    assert wait_for(accepted, timeout=10, interval=0.2)


def test_a_follower_does_not_hold_up_shutdown(own_daemon: Daemon) -> None:
    f = Follower(own_daemon, backlog=1)
    assert wait_for(lambda: bool(f.events), timeout=10)
    assert own_daemon.proc is not None
    own_daemon.proc.send_signal(signal.SIGTERM)
    f._thread.join(timeout=10)
    # Ended by the daemon, cleanly, not cut off when the server's grace ran out.
    assert f.ended_cleanly, f.error
    assert own_daemon.stop() == 0


# ----------------------------------------------------------------- metrics
def test_metrics_over_loopback_http(daemon: Daemon, port: int) -> None:
    _run_and_kill(daemon, "evt-metrics")
    reason = _bad_signature_kill(daemon, "evt-metrics")
    m = _scrape_http(port)
    assert m[("agentd_agents", (("state", "killed"),))] >= 1
    assert ("agentd_agents", (("state", "running"),)) in m
    kills = sum(v for (n, labels), v in m.items()
                if n == "agentd_kills_total" and ("action", "kill") in labels)
    assert kills >= 1
    assert m[("agentd_kill_duration_seconds_count", (("action", "kill"),))] >= 1
    assert m[("agentd_kill_duration_seconds_bucket", (("action", "kill"), ("le", "10.0")))] >= 1
    assert m[("agentd_commands_rejected_total", (("reason", reason),))] >= 1
    assert m[("agentd_estop_latched", ())] == 0
    assert 0 <= m[("agentd_enforcer_last_tick_age_seconds", ())] < 2.0


def test_metrics_over_a_unix_socket() -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="agentd-t-metrics-"))
    path = sock_dir / "metrics.sock"
    try:
        gen = _start(f'metrics_listen = "unix:{path}"\n')
        d = next(gen)
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o660
            _run_and_kill(d, "evt-unix")
            m = _scrape_unix(path)
            assert m[("agentd_agents", (("state", "killed"),))] == 1
            assert sum(v for (n, _), v in m.items() if n == "agentd_kills_total") >= 1
        finally:
            gen.close()  # stops the daemon
        assert not path.exists()  # removed at shutdown
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_non_loopback_metrics_address_stops_the_daemon_at_start(tmp_path: Path) -> None:
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    d = Daemon(tmp_path / "dev", config='metrics_listen = "0.0.0.0:9464"\n')
    with pytest.raises(RuntimeError, match="not a loopback address"):
        d.start(timeout=20)
    d.stop()


# --------------------------------------------------- health and reflection
def test_health_serving(daemon: Daemon) -> None:
    assert daemon.channel is not None
    stub = health_pb2_grpc.HealthStub(daemon.channel)
    for service in ("", "agentd.v1.Agentd"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(daemon: Daemon) -> None:
    assert daemon.channel is not None
    stub = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="agentd.v1.Agentd")]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"agentd.v1.Agentd", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto
