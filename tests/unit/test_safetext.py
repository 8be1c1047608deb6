"""agentctl.safetext: what reaches a terminal from an agent has no control character left."""

from __future__ import annotations

import random

import pytest
from agentd.v1 import agentd_pb2
from google.protobuf.descriptor import Descriptor

from agentctl.safetext import StreamEscaper, escape, escape_lines, escape_message

# What each must never let through to a terminal, by what it would do there.
ATTACKS = {
    "OSC 52 clipboard write": ("\x1b]52;c;cm0gLXJmIH4=\x07", "\\x1b]52;c;cm0gLXJmIH4=\\x07"),
    "OSC 0 title": ("\x1b]0;agentd: all agents healthy\x1b\\",
                    "\\x1b]0;agentd: all agents healthy\\x1b\\"),
    "clear screen": ("\x1b[H\x1b[2J", "\\x1b[H\\x1b[2J"),
    "carriage return": ("rm -rf /\rls -l    ", "rm -rf /\\rls -l    "),
    "C1 CSI": ("\x9b2J", "\\x9b2J"),
    "C1 OSC": ("\x9d0;title\x9c", "\\x9d0;title\\x9c"),
    "bidi override": ("access\u202e\u2066 level", "access\\u202e\\u2066 level"),
    "backspace": ("ok\x08\x08no", "ok\\x08\\x08no"),
    "DEL": ("a\x7fb", "a\\x7fb"),
    "NUL": ("a\x00b", "a\\x00b"),
    "tag characters": ("hi\U000e0041\U000e0042", "hi\\U000e0041\\U000e0042"),
}

# Every code point the terminal (or the reader) must not be handed raw.
CONTROLS = [
    *map(chr, range(0x00, 0x20)), "\x7f", *map(chr, range(0x80, 0xA0)),
    *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)),
    *map(chr, range(0x200B, 0x2010)), "\ufeff", "\u2028", "\u2029",
]


def _no_controls(text: str) -> bool:
    return not any(c in text for c in CONTROLS)


@pytest.mark.parametrize("attack", ATTACKS)
def test_escape(attack: str) -> None:
    raw, shown = ATTACKS[attack]

    assert escape(raw) == shown


@pytest.mark.parametrize("c", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_and_format_character_is_escaped(c: str) -> None:
    assert escape(f"a{c}b") == "a" + repr(c)[1:-1] + "b"


def test_printable_text_in_any_script_is_kept() -> None:
    text = "café 中文 Ελληνικά עברית 🙂 a\u00a0b\u3000c C:\\Users path=\\x1b"

    assert escape(text) == text
    assert escape_lines(text) == text


def test_text_escapes_newlines_and_tabs() -> None:
    # One field of a status block: a newline in a command line must not
    # look like the next field.
    assert escape("curl x\nstate:  exited\t") == "curl x\\nstate:  exited\\t"


def test_escape_keeps_what_it_is_told() -> None:
    assert escape("a\tb\x1b", keep="\t") == "a\tb\\x1b"


def test_lines_keep_newlines_and_tabs_and_escape_the_rest() -> None:
    assert escape_lines("one\ttwo\r\nthree\x1b[2J\n\n") == "one\ttwo\\r\nthree\\x1b[2J\n\n"


# ------------------------------------------------------------------ streams
def _through(chunks: list[bytes], encoding: str = "utf-8") -> bytes:
    esc = StreamEscaper(encoding)
    return b"".join(esc.feed(c) for c in chunks) + esc.end()


def test_stream_escape_sequence_split_across_reads() -> None:
    assert _through([b"log \x1b]5", b"2;c;aGk=\x07", b" more\x1b", b"[2J\n"]) == (
        b"log \\x1b]52;c;aGk=\\x07 more\\x1b[2J\n")


def test_stream_character_split_across_reads_is_kept_whole() -> None:
    esc = StreamEscaper()

    assert esc.feed(b"caf\xc3") == b"caf"  # the first byte of "é" waits for the second
    assert esc.feed(b"\xa9 \xe4\xb8") == "é ".encode()
    assert esc.feed(b"\xad\n") == "中\n".encode()
    assert esc.end() == b""


def test_stream_c1_control_in_utf8_split_across_reads() -> None:
    # U+009B (CSI) is C2 9B in UTF-8: split, each half must still not pass.
    assert _through([b"x\xc2", b"\x9b2J"]) == b"x\\x9b2J"


def test_stream_invalid_utf8_is_shown_not_dropped() -> None:
    # A lone 0x9b, a lead byte before ASCII, an encoded surrogate (not UTF-8).
    assert _through([b"\xff\xfe ok \x9b2J \xc3(", b"\xed\xa0\x80"]) == (
        b"\\xff\\xfe ok \\x9b2J \\xc3(\\xed\\xa0\\x80")


def test_stream_unfinished_character_at_the_end_is_shown() -> None:
    assert _through([b"end\xe4\xb8"]) == b"end\\xe4\\xb8"


def test_stream_keeps_line_structure() -> None:
    assert _through([b"a\tb\nc\r\n"]) == b"a\tb\nc\\r\n"


def test_stream_for_a_latin1_terminal_writes_no_c1_byte() -> None:
    out = _through(["é ě \x9b".encode()], encoding="latin-1")

    assert out == b"\xe9 \\u011b \\x9b"
    assert not any(0x80 <= b < 0xA0 for b in out)


def test_stream_any_bytes_any_split() -> None:
    rng = random.Random(8)
    alphabet = [b"\x1b", b"\x9b", b"\xc2", b"\xc3\xa9", b"\xe2\x80\xae", b"\r", b"\n", b"\t",
                b"a", b"\xff", b"\xe4\xb8", b"\x07", b"\x00", b"\x7f"]
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 3)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

        out = _through(chunks)

        assert out == _through([data])  # where the reads split changes nothing
        assert _no_controls(out.decode("utf-8").replace("\n", "").replace("\t", ""))
        assert out.count(b"\n") == data.count(b"\n")


# ----------------------------------------------------------------- messages
def test_escape_message_escapes_every_string_at_any_depth() -> None:
    agent = agentd_pb2.Agent(
        name="rogue", argv=["sh", "-c", "x\ry"], end_reason="\x1b[2J",
        signals=agentd_pb2.AgentSignals(recent_commands=["a\x9b"], files_written=["/\u202e"],
                                        cpu_percent=12.5),
        sandbox=agentd_pb2.Sandbox(checks=[agentd_pb2.RestrictionCheck(name="n", detail="\x07")]),
    )
    before = agent.SerializeToString()

    shown = escape_message(agent)

    assert list(shown.argv) == ["sh", "-c", "x\\ry"]
    assert shown.end_reason == "\\x1b[2J"
    assert list(shown.signals.recent_commands) == ["a\\x9b"]
    assert list(shown.signals.files_written) == ["/\\u202e"]
    assert shown.sandbox.checks[0].detail == "\\x07"
    assert shown.signals.cpu_percent == 12.5
    assert shown.name == "rogue"
    assert agent.SerializeToString() == before  # the original is untouched


def test_escape_message_keeps_presence() -> None:
    assert not escape_message(agentd_pb2.Agent()).HasField("sandbox")


def _descriptors(desc: Descriptor) -> list[Descriptor]:
    return [desc, *(d for n in desc.nested_types for d in _descriptors(n))]


def test_the_api_has_no_map_field_escape_message_would_refuse() -> None:
    messages = [d for top in agentd_pb2.DESCRIPTOR.message_types_by_name.values()
                for d in _descriptors(top)]

    maps = [f.full_name for d in messages for f in d.fields
            if f.message_type is not None and f.message_type.GetOptions().map_entry]

    assert len(messages) > 20
    assert maps == []
