"""The event bus, the metrics fed from audit records, the metrics address, journald detection.

No daemon: audit records are built by hand in the shapes the daemon writes,
and real threads, pipes and sockets stand in where those matter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import journal, metrics
from daemon.config import Config, metrics_address
from daemon.errors import ConfigError
from daemon.events import EventBus, describe, kind_of

NOW = 1_750_000_000.0


def _rec(event: str, seq: int = 1, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "ts": NOW + seq, "event": event, **fields}


def _drain(sub: Any, limit: int = 100_000) -> list[Any]:
    out = []
    for _ in range(limit):
        ev = sub.next(timeout=0)
        if ev is None:
            return out
        out.append(ev)
    raise AssertionError("subscription never ran dry")


# --------------------------------------------------------------------- bus
def test_publish_assigns_increasing_seq_and_kind() -> None:
    bus = EventBus()
    bus.publish(_rec("daemon_start", 1, version="0.1.0", pid=1, kill_method="cgroup.kill"))
    bus.publish(_rec("command", 2, decision="accepted", rpc="kill", target="rogue",
                     principals=["alice"], reason=""))
    bus.publish(_rec("lease_expired", 3, name="w", agent_id="w-1", ttl_ms=1000,
                     verified_empty=True, deadline_to_empty_ms=1.5))
    bus.publish(_rec("something_new", 4, detail="x"))
    with bus.subscribe(backlog=10, follow=False) as sub:
        got = _drain(sub)
    assert [e.seq for e in got] == [1, 2, 3, 4]
    assert [e.kind for e in got] == ["lifecycle", "command", "watchdog", "daemon"]
    assert got[1].message == "accepted kill rogue by alice"
    assert got[1].agent == "rogue"
    assert (got[2].agent, got[2].agent_id) == ("w", "w-1")
    assert json.loads(got[2].fields_json)["deadline_to_empty_ms"] == 1.5
    assert got[3].message == "something_new detail=x"


def test_backlog_is_the_most_recent_and_the_ring_is_bounded() -> None:
    bus = EventBus(ring_size=5)
    for i in range(1, 9):
        bus.publish(_rec("result", i, action="kill", name=f"a{i}"))
    with bus.subscribe(backlog=3, follow=False) as sub:
        assert [e.seq for e in _drain(sub)] == [6, 7, 8]
    with bus.subscribe(backlog=100, follow=False) as sub:
        assert [e.seq for e in _drain(sub)] == [4, 5, 6, 7, 8]
    with bus.subscribe(backlog=0, follow=False) as sub:
        assert _drain(sub) == []
        assert sub.closed


def test_follower_gets_backlog_then_live_events_without_gap_or_duplicate() -> None:
    bus = EventBus()
    bus.publish(_rec("daemon_start", 1))
    with bus.subscribe(backlog=10) as sub:
        bus.publish(_rec("agent_ended", 2, name="a"))
        assert [e.seq for e in _drain(sub)] == [1, 2]
        assert sub.next(timeout=0.01) is None  # nothing new: a timeout, not the end
        assert not sub.closed
    assert bus.subscribers == 0


def test_next_wakes_when_an_event_is_published() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        timer = threading.Timer(0.05, bus.publish, [_rec("agent_ended", 1, name="a")])
        timer.start()
        t0 = time.monotonic()
        ev = sub.next(timeout=5.0)
        timer.join()
    assert ev is not None and ev.type == "agent_ended"
    assert time.monotonic() - t0 < 2.0


def test_close_wakes_a_waiting_reader_and_bus_close_ends_followers() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    threading.Timer(0.05, bus.close).start()
    t0 = time.monotonic()
    assert sub.next(timeout=5.0) is None
    assert sub.closed and time.monotonic() - t0 < 2.0
    assert bus.subscribers == 0
    # A closed bus still keeps events for a backlog, but follows nothing.
    bus.publish(_rec("daemon_stop", 1))
    with bus.subscribe(backlog=1) as late:
        assert [e.type for e in _drain(late)] == ["daemon_stop"]
        assert late.closed


def test_slow_subscriber_never_blocks_publishers_and_learns_what_it_missed() -> None:
    bus = EventBus(queue_size=10)
    slow = bus.subscribe()
    fast = bus.subscribe()
    t0 = time.monotonic()
    for i in range(1, 1001):
        bus.publish(_rec("result", i, action="kill", name="a"))
        if i % 10 == 0:
            _drain(fast)
    assert time.monotonic() - t0 < 5.0
    got = _drain(slow)
    assert [e.seq for e in got[:10]] == list(range(1, 11))
    marker = got[10]
    assert marker.type == "events_dropped"
    assert json.loads(marker.fields_json) == {
        "event": "events_dropped", "dropped": 990, "first_seq": 11, "last_seq": 1000}
    assert "990 event(s) dropped" in marker.message
    assert len(got) == 11
    # After the gap, delivery resumes, marker first if more were lost meanwhile.
    bus.publish(_rec("agent_ended", 1001, name="a"))
    assert [e.seq for e in _drain(slow)] == [1001]
    slow.close()
    fast.close()


def test_drop_marker_is_queued_before_the_event_after_the_gap() -> None:
    bus = EventBus(queue_size=2)
    with bus.subscribe() as sub:
        for i in range(1, 6):
            bus.publish(_rec("result", i, action="kill", name="a"))
        assert [e.seq for e in [sub.next(0), sub.next(0)]] == [1, 2]
        bus.publish(_rec("result", 6, action="kill", name="a"))
        got = _drain(sub)
    assert [(e.type, e.seq) for e in got] == [("events_dropped", 5), ("result", 6)]


def test_agent_filter_matches_name_or_id() -> None:
    bus = EventBus()
    bus.publish(_rec("command", 1, decision="accepted", rpc="run", target="a",
                     principals=["bob"]))
    bus.publish(_rec("result", 2, ok=True, name="a", agent_id="a-1", main_pid=10))
    bus.publish(_rec("result", 3, ok=True, name="b", agent_id="b-1", main_pid=11))
    bus.publish(_rec("leftover_agent_killed", 4, agent_id="a-1", processes_killed=1))
    bus.publish(_rec("daemon_start", 5))
    with bus.subscribe(backlog=10, agent="a", follow=False) as sub:
        assert [e.seq for e in _drain(sub)] == [1, 2]
    with bus.subscribe(backlog=10, agent="a-1", follow=False) as sub:
        assert [e.seq for e in _drain(sub)] == [2, 4]
    with bus.subscribe(backlog=10, agent="b") as sub:
        bus.publish(_rec("agent_ended", 6, name="a", agent_id="a-1"))
        bus.publish(_rec("agent_ended", 7, name="b", agent_id="b-1"))
        assert [e.seq for e in _drain(sub)] == [3, 7]


def test_publish_never_raises_into_the_audit_path(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        bus.publish(_rec("result", 1, action="kill", name="a", duration_ms="not a number",
                         blob=object()))
        bus.publish({"event": "weird"})  # no seq, no ts
        got = _drain(sub)
    assert [e.type for e in got] == ["result", "weird"]
    assert got[0].message.startswith("kill a:")


@pytest.mark.parametrize(("event", "kind"), [
    ("daemon_start", "lifecycle"), ("agent_killed_by_daemon", "lifecycle"),
    ("result", "command"), ("tripwire", "rule"), ("detector_verdict", "rule"),
    ("guardian_killed", "watchdog"), ("audit_chain_broken", "watchdog"),
    ("replay_cache_pruned", "daemon"),
])
def test_kinds(event: str, kind: str) -> None:
    assert kind_of(event) == kind


def test_messages_are_one_short_line() -> None:
    assert describe(_rec("command", decision="rejected", rpc="kill",
                         error_reason="bad_signature", error="no valid\nsignature")) == (
        "rejected kill: bad_signature: no valid signature")
    assert describe(_rec("result", action="kill", name="rogue", processes_killed=3,
                         duration_ms=0.42, method="cgroup.kill", verified_empty=True)) == (
        "kill rogue: 3 process(es) gone in 0.4 ms by cgroup.kill, verified empty")
    assert describe(_rec("agent_ended", name="rogue", state="killed", end_reason="killed",
                         exit_code=None, exit_signal=9)) == (
        "rogue ended: killed (killed), signal 9")
    assert len(describe(_rec("command", decision="rejected", error="x" * 5000))) <= 300


# ----------------------------------------------------------------- metrics
def _scrape(m: metrics.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_what_the_audit_log_records() -> None:
    m = metrics.Metrics()
    m.record(_rec("daemon_start", kill_method="cgroup.kill"))
    m.record(_rec("result", action="kill", name="a", method="cgroup.kill", duration_ms=0.7,
                  already_ended=False))
    m.record(_rec("result", action="kill", name="a", method="none", duration_ms=0.1,
                  already_ended=True))
    m.record(_rec("result", action="stop", name="b", method="SIGTERM", duration_ms=40.0))
    m.record(_rec("result", action="estop", agents_killed=3, duration_ms=2.0))
    m.record(_rec("lease_expired", name="c", deadline_to_empty_ms=0.3))
    m.record(_rec("command", decision="rejected", error_reason="bad_signature"))
    m.record(_rec("command", decision="rejected", error_reason="bad_signature"))
    m.record(_rec("command", decision="accepted", rpc="kill"))
    m.record(_rec("tripwire", rule="no-ssh", name="a", suppressed=0))
    # Rate-limited records: each hit in between is counted once, wherever it is recorded.
    m.record(_rec("tripwire_suppressed", rule="no-ssh", name="a", suppressed=4))
    m.record(_rec("tripwire", rule="no-ssh", name="a", suppressed=2))
    m.record(_rec("agent_killed_by_daemon", reason="tripwire:no-ssh", name="a",
                  method="cgroup.kill", duration_ms=0.2, already_ended=False))
    # No method recorded: counted under the daemon's kill method (from daemon_start).
    m.record({"event": "result", "action": "kill"})
    s = _scrape(m)
    assert s[("agentd_kills_total", (("action", "kill"), ("method", "cgroup.kill")))] == 2
    assert ("agentd_kills_total", (("action", "kill"), ("method", "none"))) not in s
    assert s[("agentd_kills_total", (("action", "stop"), ("method", "SIGTERM")))] == 1
    assert s[("agentd_kills_total", (("action", "estop"), ("method", "cgroup.kill")))] == 3
    assert s[("agentd_kills_total", (("action", "lease"), ("method", "cgroup.kill")))] == 1
    assert s[("agentd_lease_expiries_total", ())] == 1
    assert s[("agentd_commands_rejected_total", (("reason", "bad_signature"),))] == 2
    assert s[("agentd_tripwire_hits_total", (("rule", "no-ssh"),))] == 8
    assert s[("agentd_kills_total", (("action", "tripwire"), ("method", "cgroup.kill")))] == 1
    assert s[("agentd_kill_duration_seconds_bucket", (("action", "kill"), ("le", "0.001")))] == 1
    assert s[("agentd_kill_duration_seconds_bucket", (("action", "kill"), ("le", "0.0005")))] == 0
    assert s[("agentd_kill_duration_seconds_count", (("action", "lease"),))] == 1
    # Not attached to a supervisor yet: the present-tense gauges have no samples.
    assert not any(name == "agentd_agents" for name, _ in s)


@pytest.mark.parametrize(("value", "remote", "expected"), [
    ("", False, None),
    ("127.0.0.1:9464", False, ("127.0.0.1", 9464)),
    ("[::1]:9464", False, ("::1", 9464)),
    ("localhost:0", False, ("localhost", 0)),
    ("0.0.0.0:9464", True, ("0.0.0.0", 9464)),
    ("unix:/run/agentd/metrics.sock", False, Path("/run/agentd/metrics.sock")),
])
def test_metrics_address(value: str, remote: bool, expected: object) -> None:
    assert metrics_address(value, allow_remote=remote, source="t") == expected


@pytest.mark.parametrize(("value", "words"), [
    ("0.0.0.0:9464", "not a loopback address"),
    ("10.1.2.3:9464", "metrics_allow_remote = true"),
    ("metrics.example.com:9464", "not a loopback address"),
    ("9464", "is not HOST:PORT"),
    (":9464", "is not HOST:PORT"),
    ("127.0.0.1:99999", "is not HOST:PORT"),
    ("unix:metrics.sock", "must be absolute"),
])
def test_metrics_address_refused(value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        metrics_address(value, allow_remote=False, source="t")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[metrics.MetricsServer]:
    m = metrics.Metrics()
    m.record(_rec("command", decision="rejected", error_reason="expired"))
    server = metrics.serve(m, Config(metrics_listen=f"127.0.0.1:{_free_port()}"))
    assert server is not None
    yield server
    server.stop()


def test_metrics_served_over_loopback_http(served: metrics.MetricsServer) -> None:
    with urllib.request.urlopen(served.where, timeout=5) as resp:
        body = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'agentd_commands_rejected_total{reason="expired"} 1.0' in body
    with pytest.raises(urllib.error.HTTPError, match="404") as err:
        urllib.request.urlopen(served.where.replace("/metrics", "/nope"), timeout=5)
    err.value.close()


def test_metrics_on_a_unix_socket_and_a_silent_client_cannot_hold_stop(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.sock"
    server = metrics.serve(metrics.Metrics(), Config(metrics_listen=f"unix:{path}"))
    assert server is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(path))
        c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b"".join(iter(lambda: c.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.0 200") and b"agentd_estop_latched" in reply
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(path))  # says nothing: the single serving thread waits on it
        time.sleep(0.2)
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 4.0
    assert not path.exists()


def test_metrics_bind_failure_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            assert metrics.serve(metrics.Metrics(),
                                 Config(metrics_listen=f"127.0.0.1:{port}")) is None
    assert "continuing without metrics" in caplog.text


# ----------------------------------------------------------------- journald
@pytest.fixture
def pipe_fd() -> Iterator[int]:
    r, w = os.pipe()
    yield w
    os.close(r)
    os.close(w)


def test_journal_stream_must_name_our_stderr(pipe_fd: int, tmp_path: Path) -> None:
    st = os.fstat(pipe_fd)
    missing = tmp_path / "no-journal-socket"
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert journal.under_journald(env, pipe_fd, missing)
    # Inherited by a process whose stderr was redirected since: not the journal.
    assert not journal.under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"},
                                      pipe_fd, missing)
    assert not journal.under_journald({"JOURNAL_STREAM": "garbage"}, pipe_fd, missing)
    assert not journal.under_journald({"JOURNAL_STREAM": "1:x"}, pipe_fd, missing)
    assert not journal.under_journald({}, pipe_fd, missing)


def test_notify_socket_counts_only_with_a_journal_socket(pipe_fd: int, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    sock_path = tmp_path / "journal.sock"
    assert not journal.under_journald(env, pipe_fd, sock_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        assert journal.under_journald(env, pipe_fd, sock_path)


def test_audit_records_become_log_lines_with_journal_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="agentd.audit"):
        journal.log_audit_record(_rec("lease_expired", 7, name="w", agent_id="w-1",
                                      ttl_ms=500, verified_empty=True,
                                      deadline_to_empty_ms=0.2))
    (r,) = caplog.records
    assert r.getMessage().startswith("lease_expired: w: lease expired (ttl 500 ms)")
    assert (r.EVENT, r.EVENT_KIND, r.AGENT_NAME, r.AGENT_ID, r.AUDIT_SEQ) == (  # type: ignore[attr-defined]
        "lease_expired", "watchdog", "w", "w-1", "7")
    assert not r.args  # JournalHandler would send args as a CODE_ARGS field
