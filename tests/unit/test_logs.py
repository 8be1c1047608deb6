"""The Logs RPC's reading of log files: tails across FILE.1, following across rotations.

A real LogSink (the reactor's) writes the files, as it does for agents.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.api import logs
from daemon.errors import LaunchFailed
from daemon.supervisor.reactor import LogSink


@dataclass
class FakeAgent:
    """What logs.stream needs of an agent."""

    stdout_log: Path
    stderr_log: Path
    ended: threading.Event = field(default_factory=threading.Event)


def _agent(tmp_path: Path) -> FakeAgent:
    return FakeAgent(tmp_path / "a.stdout.log", tmp_path / "a.stderr.log")


def _collect(agent: FakeAgent, **kw: object) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    for stream, data in logs.stream(agent, **kw):  # type: ignore[arg-type]
        assert len(data) <= logs.CHUNK
        out[stream] += data
    return out


def test_tail_of_each_stream_across_the_rotated_file(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    a.stdout_log.with_name("a.stdout.log.1").write_bytes(b"old " * 100)
    a.stdout_log.write_bytes(b"new " * 10)
    a.stderr_log.write_bytes(b"\xff\x00err")
    got = _collect(a, tail_bytes=60, follow=False, active=lambda: True)
    assert got == {"stdout": (b"old " * 100 + b"new " * 10)[-60:], "stderr": b"\xff\x00err"}
    got = _collect(a, tail_bytes=0, follow=False, active=lambda: True)  # 0: the default
    assert got["stdout"] == b"old " * 100 + b"new " * 10


def test_missing_files_are_empty(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    a.ended.set()
    assert _collect(a, tail_bytes=10, follow=True, active=lambda: True, poll_s=0.01) == {
        "stdout": b"", "stderr": b""}


def test_a_large_tail_comes_in_chunks(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    a.stdout_log.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    got = _collect(a, tail_bytes=1 << 20, follow=False, active=lambda: True)
    assert got["stdout"] == bytes(range(256)) * 1024


def test_follow_across_rotations_loses_and_repeats_nothing(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    sinks = {"stdout": LogSink(a.stdout_log, 2048), "stderr": LogSink(a.stderr_log, 2048)}
    sinks["stdout"].write(b"before the reader came\n")
    written = {"stdout": b"before the reader came\n", "stderr": b""}

    def writer() -> None:
        for i in range(600):
            for name, sink in sinks.items():
                line = f"{name} line {i}\n".encode()
                sink.write(line)
                written[name] += line
            time.sleep(0.001)
        for sink in sinks.values():
            sink.close()
        a.ended.set()

    t = threading.Thread(target=writer)
    t.start()
    got = _collect(a, tail_bytes=1 << 20, follow=True, active=lambda: True, poll_s=0.01)
    t.join()
    assert a.stdout_log.with_name("a.stdout.log.1").exists()  # it did rotate, several times
    assert got == written


def test_follow_ends_when_the_client_goes_away(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    a.stdout_log.write_bytes(b"x")
    polls = iter([True, True, False])
    t0 = time.monotonic()
    got = _collect(a, tail_bytes=10, follow=True, active=lambda: next(polls), poll_s=0.01)
    assert got["stdout"] == b"x"
    assert time.monotonic() - t0 < 1


def test_a_planted_symlink_or_file_at_the_log_path_is_never_written_through(
        tmp_path: Path) -> None:
    """Root writes agents' logs: only into files it has just made itself (O_EXCL|O_NOFOLLOW)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "a.stdout.log"
    link.symlink_to(victim)
    with pytest.raises(LaunchFailed, match="cannot create the agent's log"):
        LogSink(link, 2048)
    hard = tmp_path / "a.stderr.log"
    hard.hardlink_to(victim)
    with pytest.raises(LaunchFailed, match="File exists"):
        LogSink(hard, 2048)
    assert victim.read_text() == "precious\n"
    # Rotation renames over a symlink at FILE.1, and writes to a new FILE.
    sink = LogSink(tmp_path / "b.log", 16)
    (tmp_path / "b.log.1").symlink_to(victim)
    sink.write(b"0123456789")
    sink.write(b"0123456789")
    sink.close()
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "b.log.1").read_bytes() == b"0123456789"
    assert not (tmp_path / "b.log.1").is_symlink()


def test_a_tail_is_at_most_max_tail(tmp_path: Path) -> None:
    """A client asking for a huge tail gets MAX_TAIL: the tail is read into the daemon's memory."""
    from daemon.api.logs import MAX_TAIL

    a = _agent(tmp_path)
    a.stdout_log.write_bytes(b"x" * (MAX_TAIL + 4096) + b"END")
    got = _collect(a, tail_bytes=1 << 40, follow=False, active=lambda: True)
    assert len(got["stdout"]) == MAX_TAIL
    assert got["stdout"].endswith(b"END")


def test_a_first_write_larger_than_the_cap_is_not_rotated_into_an_empty_file(
        tmp_path: Path) -> None:
    sink = LogSink(tmp_path / "a.stdout.log", 16)
    sink.write(b"x" * 40)  # one read larger than the cap
    assert not (tmp_path / "a.stdout.log.1").exists()
    sink.write(b"y")  # the next one rotates: FILE.1 holds the first read
    assert (tmp_path / "a.stdout.log.1").read_bytes() == b"x" * 40
    assert (tmp_path / "a.stdout.log").read_bytes() == b"y"
    sink.close()
