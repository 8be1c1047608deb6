"""The emergency socket: a signed kill gets in while the control socket is flooded.

The control socket is reachable by its whole group (agents' supervisors,
control planes); anyone there can fill its connections. The emergency
socket serves stop, kill, estop and freeze only, behind a group of its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2, agentd_pb2_grpc
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from agentctl.cli import cli
from tests.harness import Daemon, pids_in, wait_for

pytestmark = pytest.mark.root

# The fewest connections a daemon takes (daemon.api.server.max_connections).
CAP = 16
# HTTP/2's client preface and an empty SETTINGS frame (RFC 9113 section 3.4).
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture
def capped(tmp_root: Path) -> Iterator[Daemon]:
    from tests.conftest import ROOT_REASON

    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    d = Daemon(tmp_root / "dev", config=f"max_connections = {CAP}\n").start()
    yield d
    d.stop()


@contextlib.contextmanager
def _flood(path: Path, n: int) -> Iterator[list[socket.socket]]:
    """n connections that said hello (the HTTP/2 preface) and then nothing."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(path))
                s.sendall(_PREFACE)
            except OSError:
                s.close()
                continue
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()


def _info_ok(path: Path, timeout: float) -> bool:
    """Whether a new client (a connection of its own) is answered."""
    # A local subchannel pool: without it, gRPC would reuse the connection
    # the harness already holds to the same socket.
    with grpc.insecure_channel(f"unix:{path}",
                               options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            agentd_pb2_grpc.AgentdStub(ch).Info(agentd_pb2.InfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return True


def test_the_emergency_socket_has_its_own_gate(capped: Daemon) -> None:
    stop_sock = capped.dir / "stop" / "stop.sock"
    assert stat.S_ISSOCK(os.stat(stop_sock).st_mode)
    assert stat.S_IMODE(os.stat(stop_sock).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(stop_sock.parent).st_mode) == 0o750
    with grpc.insecure_channel(f"unix:{stop_sock}") as ch:
        stub = agentd_pb2_grpc.AgentdStub(ch)
        assert stub.Info(agentd_pb2.InfoRequest(), timeout=30).host_id == capped.host_id
        # Nothing that starts or loosens, nor any read beyond Info.
        with pytest.raises(grpc.RpcError) as err:
            stub.Run(capped.signed(lambda c: c.run.argv.append("/bin/true")), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            stub.ListAgents(agentd_pb2.ListAgentsRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_kill_gets_in_while_the_control_socket_is_flooded(capped: Daemon,
                                                            tmp_root: Path) -> None:
    agent = capped.run("flooded", ["/bin/sleep", "1000"])
    with _flood(capped.socket, 4 * CAP) as held:
        assert len(held) >= CAP
        # The flood works: a new client of the control socket is not served.
        assert not _info_ok(capped.socket, timeout=3)
        key = tmp_root / "oncall.key"
        key.write_bytes(capped.keys.oncall.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        key.chmod(0o600)
        r = CliRunner().invoke(cli, [
            "--socket", str(capped.socket),
            "--stop-socket", str(capped.dir / "stop" / "stop.sock"),
            "--key", str(key), "--json", "kill", "flooded", "--reason", "flood test"])
        assert r.exit_code == 0, r.output
        assert '"verified_empty": true' in r.output, r.output
        assert pids_in(agent.cgroup_paths[0]) == []
    # The flood gone, the control socket serves again.
    assert wait_for(lambda: _info_ok(capped.socket, timeout=3), 60)
