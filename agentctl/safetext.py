"""What an agent controls, made safe to show on a terminal: every control character escaped.

An agent chooses its output, its command lines, the files it writes and the
addresses it connects to. Printed raw on the operator's terminal, those bytes
can set the window title (OSC 0), write the clipboard (OSC 52), clear the
screen (CSI 2J), overwrite a line (a carriage return) or reorder what the
operator reads (bidi overrides: "Trojan Source", CVE-2021-42574). So on a
terminal agentctl shows each such character as Python's ``repr`` writes it
(``\\x1b``, ``\\r``, ``\\x9b``, ``\\u202e``); into a pipe or a file, or with
``--raw``, it prints the exact text.

Escaped: every character ``str.isprintable()`` calls unprintable (Unicode
categories Cc, Cf, Cs, Co, Cn, Zl, Zp): C0 controls, DEL, C1 controls (which
some terminals read as CSI and OSC), bidi and zero-width format characters,
line and paragraph separators, unassigned code points. Kept: printable text in
any script ("café", CJK), and the space separators (Zs: NBSP, ideographic
space), which a terminal shows as blank. A backslash is not doubled: as with
``cat -v`` and ``less``, the view is for reading, not a lossless encoding
(the exact bytes are one ``--raw`` or ``| cat`` away).
"""

from __future__ import annotations

import codecs
import unicodedata
from typing import IO, Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def is_terminal(stream: IO[Any]) -> bool:
    """True if *stream* is a terminal; the one place agentctl asks (``isatty(3)``)."""
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def escape(text: str, *, keep: str = "") -> str:
    """*text* with every unprintable character escaped as ``repr`` does, but those in *keep*."""
    if text.isprintable():
        return text
    return "".join(c if c in keep or _shown(c) else _escaped(c) for c in text)


def escape_lines(text: str) -> str:
    """*text* escaped, but its newlines and tabs kept: the line structure of a log."""
    return "\n".join(escape(line, keep="\t") for line in text.split("\n"))


def _shown(c: str) -> bool:
    return c.isprintable() or unicodedata.category(c) == "Zs"


def _escaped(c: str) -> str:
    # unicode_escape writes \t \n \r, then \xNN, \uNNNN or \UNNNNNNNN: repr's forms.
    return c.encode("unicode_escape").decode("ascii")


class StreamEscaper:
    """Escape one byte stream (an agent's stdout or its stderr) chunk by chunk.

    The agent's bytes are decoded as UTF-8 by an incremental decoder, so a
    character split across two reads is shown whole once its last byte comes;
    bytes that are not UTF-8 are shown as ``\\xNN``, never dropped and never
    passed on. Each control character is escaped on its own, so an escape
    sequence split across reads needs no state. The result is encoded for the
    terminal (*encoding*, its locale's), what it cannot show escaped too: on
    an 8-bit terminal, a UTF-8 continuation byte 0x9b would be a CSI.
    """

    def __init__(self, encoding: str = "utf-8") -> None:
        """Start a stream; *encoding* is the terminal's."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self._encoding = encoding

    def feed(self, data: bytes) -> bytes:
        """The escaped form of *data*; up to 3 bytes of an unfinished character wait."""
        return self._encode(self._decoder.decode(data))

    def end(self) -> bytes:
        """The escaped form of what still waits (an unfinished character at the end)."""
        return self._encode(self._decoder.decode(b"", final=True))

    def _encode(self, text: str) -> bytes:
        return escape_lines(text).encode(self._encoding, errors="backslashreplace")


def escape_message(msg: M) -> M:
    """A copy of *msg* with every string field, at any depth, escaped (see :func:`escape`).

    For the daemon's answers: whatever a render function picks from the copy
    is safe to print, including fields added later. Raises TypeError for a
    map field (the API has none; escaping one needs its own code).
    """
    copy = type(msg)()
    copy.CopyFrom(msg)
    _escape_fields(copy)
    return copy


def _escape_fields(msg: Message) -> None:
    for field, value in msg.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                escaped = [escape(v) for v in value]
                del value[:]
                value.extend(escaped)
            else:
                setattr(msg, field.name, escape(value))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                raise TypeError(f"cannot escape map field {field.full_name}")
            for sub in value if field.is_repeated else [value]:
                _escape_fields(sub)
