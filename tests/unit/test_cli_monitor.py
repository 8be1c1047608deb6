"""agentctl status's signals block and agentctl top, offline: exact output for known answers.

A stand-in client (Settings.connect) answers ListAgents and GetAgent; the
real daemon's tests are in tests/test_signals.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentd.v1 import agentd_pb2
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp

from agentctl.cli import cli
from agentctl.context import Settings

NOW = 1_750_000_000.0


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromSeconds(int(t))
    return ts


def _busy() -> agentd_pb2.Agent:
    return agentd_pb2.Agent(
        name="rogue", id="rogue-1", state=agentd_pb2.AGENT_STATE_RUNNING, pids=[10, 11, 12],
        memory_bytes=48 << 20, main_pid=10, started_at=_ts(NOW - 192), user="nobody",
        uid=65534, argv=["python3", "agent.py"],
        signals=agentd_pb2.AgentSignals(
            sampled_at=_ts(NOW - 1), uptime_s=191, processes_started=14,
            processes_per_second=2.0, recent_commands=["python3 agent.py", "curl -s evil"],
            cpu_seconds=95.5, cpu_percent=99.2, memory_bytes=48 << 20, pids=3, sockets_open=4,
            connections=2, remote_addresses=["10.0.0.7:443", "[2001:db8::1]:22"],
            files_written=["/etc/cron.d/x"], oom_kills=1, tripwire_hits=2,
        ),
    )


def _idle() -> agentd_pb2.Agent:
    return agentd_pb2.Agent(
        name="idle", id="idle-1", state=agentd_pb2.AGENT_STATE_RUNNING, pids=[20],
        memory_bytes=3 << 20, started_at=_ts(NOW - 5),
        signals=agentd_pb2.AgentSignals(sampled_at=_ts(NOW - 1), uptime_s=4, pids=1,
                                        processes_started=1, processes_per_second=0.2),
    )


def _ended() -> agentd_pb2.Agent:
    return agentd_pb2.Agent(
        name="done", id="done-1", state=agentd_pb2.AGENT_STATE_EXITED,
        started_at=_ts(NOW - 600), ended_at=_ts(NOW - 60), oom_kills=3,
        signals=agentd_pb2.AgentSignals(sampled_at=_ts(NOW - 61), cpu_percent=80),
    )


class _Client:
    def __init__(self, agents: list[agentd_pb2.Agent]) -> None:
        self.agents = agents
        self.calls = 0

    def list_agents(self) -> list[agentd_pb2.Agent]:
        self.calls += 1
        return self.agents

    def get_agent(self, name: str) -> agentd_pb2.Agent:
        return next(a for a in self.agents if a.name == name)

    def close(self) -> None:
        pass


def _invoke(args: list[str], client: _Client) -> Result:
    def connect(path: Path, **kw: Any) -> _Client:
        return client

    settings = Settings(clock=lambda: NOW, connect=connect)  # type: ignore[arg-type]
    return CliRunner().invoke(cli, args, obj=settings,
                              env={"AGENTD_SOCKET": None, "AGENTCTL_KEY": None})


def test_status_shows_the_signals_block() -> None:
    result = _invoke(["status", "rogue"], _Client([_busy()]))

    assert result.exit_code == 0, result.stderr
    block = result.stdout.split("started by:  -\n", 1)[1]
    assert block == (
        "signals:     sampled 2025-06-15 15:06:39Z (1s ago) by the daemon, "
        "from cgroupfs and /proc\n"
        "  uptime:            3m11s\n"
        "  processes started: 14 (2.0/s)\n"
        "  recent commands:   python3 agent.py\n"
        "                     curl -s evil\n"
        "  cpu:               99.2% (1m35s in all)\n"
        "  memory:            48M\n"
        "  pids:              3\n"
        "  sockets:           4 open, 2 connections\n"
        "  remote addresses:  10.0.0.7:443\n"
        "                     [2001:db8::1]:22\n"
        "  files written:     /etc/cron.d/x\n"
        "  oom kills:         1\n"
        "  tripwire hits:     2\n"
    )


def test_status_of_an_ended_agent_says_the_sample_is_its_last() -> None:
    result = _invoke(["status", "done"], _Client([_ended()]))

    assert "signals:     last sampled 2025-06-15 15:05:39Z (1m01s ago), before it ended\n" \
        in result.stdout


def test_top_once() -> None:
    result = _invoke(["top", "--once"], _Client([_idle(), _ended(), _busy()]))

    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "NAME   STATE    PIDS  CPU%  MEM  PROC/S  SOCKS  CONNS  OOM  UPTIME\n"
        "rogue  running  3     99.2  48M  2.0     4      2      1    3m12s\n"
        "idle   running  1     0.0   3M   0.2     0      0      0    5s\n"
        "done   exited   0     -     0B   -       -      -      3    ended 1m00s ago\n"
    )


def test_top_json_is_one_snapshot() -> None:
    client = _Client([_busy()])

    result = _invoke(["top", "--json", "--interval", "5s"], client)

    doc = json.loads(result.stdout)
    assert client.calls == 1
    assert doc["at"] == "2025-06-15T15:06:40+00:00"
    (row,) = doc["agents"]
    assert (row["name"], row["state"], row["pids"], row["memory_bytes"]) == (
        "rogue", "running", 3, 48 << 20)
    assert row["signals"]["processes_started"] == 14  # a number, not the proto3 JSON string
    assert row["signals"]["remote_addresses"] == ["10.0.0.7:443", "[2001:db8::1]:22"]


def test_top_without_a_terminal_prints_successive_tables() -> None:
    client = _Client([_idle()])

    result = _invoke(["top", "--interval", "100ms", "-n", "2"], client)

    assert result.exit_code == 0, result.stderr
    assert client.calls == 2
    assert "\x1b[" not in result.stdout  # no screen control codes into a pipe or file
    tables = result.stdout.split("\n\n")
    assert [t.splitlines()[0] for t in tables if t] == [
        "agentd top: 1 agent(s) at 15:06:40Z, every 100ms"] * 2


def test_top_refuses_a_too_short_interval() -> None:
    result = _invoke(["top", "--interval", "10ms"], _Client([]))

    assert result.exit_code == 2
    assert result.stderr == ("agentctl: error: Invalid value for '--interval': must be at "
                             "least 100ms (see 'agentctl top --help')\n")
