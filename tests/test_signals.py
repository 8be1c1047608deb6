"""Kernel-observed signals end to end: real agents, the daemon's sampler, the API, agentctl.

Every number here is what the daemon read from cgroupfs and /proc; the
agents (tests/hostile/) never report anything. Network tests use only a
listener this test opens on 127.0.0.1, closed when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentd.v1 import agentd_pb2
from click.testing import CliRunner, Result

from agentctl.cli import cli
from tests.harness import AGENT_PYTHON, Daemon, wait_for

pytestmark = pytest.mark.root

INTERVAL_S = 0.2


@pytest.fixture(scope="module", params=["hybrid", "v2"])
def sd(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon per cgroup mode that samples every 0.2 s."""
    from tests.conftest import mode_daemon

    yield from mode_daemon(str(request.param), f"sample_interval_s = {INTERVAL_S}\n")


@pytest.fixture
def agent(sd: Daemon, hostile: Path) -> Iterator[Callable[..., agentd_pb2.Agent]]:
    """Run a hostile program as an agent, wait for its "ready"; kill it afterwards."""
    names: list[str] = []

    def run(name: str, program: str, *args: str, **sandbox: object) -> agentd_pb2.Agent:
        # sandbox: policy overrides, and the admin key and reason they need.
        a = sd.run(name, [AGENT_PYTHON, str(hostile / program), *args], **sandbox)  # type: ignore[arg-type]
        names.append(name)
        assert wait_for(lambda: "ready" in Path(a.stdout_log).read_text(), 15), (
            Path(a.stderr_log).read_text())
        return a

    yield run
    for name in names:
        sd.kill(name)


def _signals_until(d: Daemon, name: str,
                   cond: Callable[[agentd_pb2.AgentSignals], bool]) -> agentd_pb2.AgentSignals:
    """The agent's signals once cond holds (a few sampling periods at most)."""
    assert wait_for(lambda: cond(d.get(name).signals), 15, interval=INTERVAL_S / 2), (
        d.get(name).signals)
    return d.get(name).signals


def _agentctl(d: Daemon, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--socket", str(d.socket), *args],
                                env={"AGENTD_SOCKET": None, "AGENTCTL_KEY": None})
    assert result.exit_code == 0, result.stderr
    return result


def test_children_and_their_command_lines(sd: Daemon, agent: Callable[..., agentd_pb2.Agent]
                                          ) -> None:
    agent("kids", "spawn_children.py", "5")

    # pids counts bwrap's two processes too: wait for the five children
    # themselves, which a loaded machine may start after the first samples.
    s = _signals_until(sd, "kids", lambda s: s.processes_started >= 6 and all(
        any(c.endswith(f"signals-child-{i}") for c in s.recent_commands) for i in range(5)))

    assert s.processes_started >= 6  # the main process and its five children
    assert s.pids >= 6
    for i in range(5):
        assert any(c.endswith(f"signals-child-{i}") for c in s.recent_commands), s.recent_commands
    assert any("spawn_children.py 5" in c for c in s.recent_commands)
    assert s.uptime_s > 0
    assert s.sampled_at.seconds > 0
    status = _agentctl(sd, "status", "kids").stdout
    assert "processes started: " in status
    assert "signals-child-4" in status

    sd.kill("kids")
    ended = sd.get("kids")
    # The last sample survives the agent's end, for the post-mortem.
    assert ended.signals.processes_started >= 6
    assert "before it ended" in _agentctl(sd, "status", "kids").stdout


def test_a_cpu_burner(sd: Daemon, agent: Callable[..., agentd_pb2.Agent]) -> None:
    agent("burner", "cpu_burn.py")

    s = _signals_until(sd, "burner", lambda s: s.cpu_percent > 50)

    assert s.cpu_seconds > 0
    top = json.loads(_agentctl(sd, "top", "--once", "--json").stdout)
    (row,) = [r for r in top["agents"] if r["name"] == "burner"]
    assert row["state"] == "running"
    assert row["signals"]["cpu_percent"] > 50
    table = _agentctl(sd, "top", "--once").stdout
    assert table.splitlines()[0].split() == [
        "NAME", "STATE", "PIDS", "CPU%", "MEM", "PROC/S", "SOCKS", "CONNS", "OOM", "UPTIME"]
    assert any(line.startswith("burner ") for line in table.splitlines())


def test_a_connection_to_a_loopback_listener(sd: Daemon,
                                             agent: Callable[..., agentd_pb2.Agent]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)  # the kernel completes the handshake; nothing needs accepting
        port = listener.getsockname()[1]
        # The default sandbox has no network: the host's is an admin's grant.
        agent("caller", "connect_out.py", "127.0.0.1", str(port),
              overrides=agentd_pb2.PolicyOverrides(network="host"), key=sd.keys.admin,
              reason="reach the test's listener")

        s = _signals_until(sd, "caller", lambda s: s.connections >= 1)

        assert f"127.0.0.1:{port}" in s.remote_addresses
        assert s.sockets_open >= 1
        status = _agentctl(sd, "status", "caller").stdout
        assert f"127.0.0.1:{port}" in status
        top = json.loads(_agentctl(sd, "top", "--json").stdout)
        (row,) = [r for r in top["agents"] if r["name"] == "caller"]
        assert row["signals"]["connections"] >= 1
        sd.kill("caller")


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    """A world-writable directory outside the allowed scratch paths (/tmp, /var/tmp, /dev)."""
    d = Path(tempfile.mkdtemp(prefix="agentd-signals-", dir="/run"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_file_written_outside_scratch(sd: Daemon, agent: Callable[..., agentd_pb2.Agent],
                                        outside_dir: Path, tmp_path: Path) -> None:
    target = outside_dir / "loot.txt"
    # /run is private to the sandbox: the directory is bound in writable.
    agent("writer", "write_outside.py", str(target),
          overrides=agentd_pb2.PolicyOverrides(bind_rw=[str(outside_dir)]), key=sd.keys.admin,
          reason="the test's outside directory")
    scratch = Path(tempfile.mkdtemp(prefix="agentd-signals-", dir="/tmp"))
    try:
        # The sandbox's own /tmp (inside /scratch).
        agent("scribe", "write_outside.py", "/tmp/notes.txt")

        s = _signals_until(sd, "writer", lambda s: bool(s.files_written))

        assert list(s.files_written) == [str(target)]
        assert str(target) in _agentctl(sd, "status", "writer").stdout
        # Writing under /tmp is allowed: sampled, and nothing reported.
        assert _signals_until(sd, "scribe", lambda s: s.pids >= 1).files_written == []
    finally:
        sd.kill("scribe")
        shutil.rmtree(scratch, ignore_errors=True)
