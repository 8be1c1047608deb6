"""Scanning agent output against every text rule at once, as it is written.

All text rules of a stream go into one RE2 set, so each write is scanned once
whatever the number of rules (about 500 MB/s on one core), in time linear in
its length whatever the patterns: the agent chooses the text, and a
backtracking engine would let it stall the one thread that drains every
agent's pipes. Only when the set reports a match does the rule's own regex
run, to find where.

Writes are scanned as bytes: invalid UTF-8 cannot hide what surrounds it,
and nothing is decoded on the common path. A match that straddles two writes
is caught by carrying the previous write's last bytes (the longest rule's
max_length) into the next scan; each rule remembers where its last reported
match ended, so nothing is reported twice.

Pure and single-threaded: one StreamScanner per agent stream, fed on the
reactor thread. Acting on hits is daemon.monitor.tripwires' business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import re2

from daemon.monitor.rules import SEVERITY, TextRule, re2_options

EXCERPT_CONTEXT = 80  # characters either side of a match
EXCERPT_MATCH_MAX = 240  # longer matches are cut in the middle


@dataclass(frozen=True)
class Hit:
    """One rule matched new output."""

    rule: TextRule
    stream: str
    offset: int  # where the match starts, in bytes since the stream began
    excerpt: str  # the match with context, control characters escaped


class TextMatcher:
    """The text rules that apply to one stream, compiled once and shared by every agent."""

    def __init__(self, rules: Sequence[TextRule], stream: str) -> None:
        # Most forceful first: when a write matches several rules, hits come
        # out in the order their actions should be weighed.
        self.rules = sorted((r for r in rules if stream in r.streams),
                            key=lambda r: -SEVERITY[r.action])
        self.stream = stream
        opts = re2_options()
        self._set: Any = re2.Set.SearchSet(opts)
        self._each: list[Any] = []
        for rule in self.rules:
            pattern = rule.re2_pattern()
            self._set.Add(pattern)
            self._each.append(re2.compile(pattern, opts))
        if self.rules:
            self._set.Compile()
        # Bytes carried from one write into the next: enough for the longest
        # rule's match to straddle the boundary, and for an excerpt's context
        # before a match that starts a write.
        self.carry = max([r.max_length - 1 for r in self.rules] + [4 * EXCERPT_CONTEXT])

    def __bool__(self) -> bool:
        return bool(self.rules)

    def scanner(self) -> StreamScanner:
        return StreamScanner(self)


class StreamScanner:
    """One agent's stream: the carried tail and what each rule last reported."""

    def __init__(self, matcher: TextMatcher) -> None:
        self._m = matcher
        self._tail = b""
        self._offset = 0  # bytes of the stream seen so far
        self._last_end: dict[int, int] = {}  # rule index -> stream offset its last hit ended

    @property
    def offset(self) -> int:
        return self._offset

    def feed(self, data: bytes) -> list[Hit]:
        """Scan one write; returns at most one new hit per rule, most forceful rule first.

        A rule matching many times in one write is one hit: the rate of hits,
        not of matches, is what the caller limits and audits.
        """
        m = self._m
        if not m.rules or not data:
            self._offset += len(data)
            return []
        tail = self._tail
        buf = tail + data if tail else data
        base = self._offset - len(tail)  # stream offset of buf[0]
        hits: list[Hit] = []
        matched = m._set.Match(buf)
        if matched:
            for i in sorted(matched):
                hit = self._locate(i, buf, base, len(tail))
                if hit is not None:
                    hits.append(hit)
        self._offset += len(data)
        self._tail = buf[-m.carry:] if m.carry else b""
        return hits

    def _locate(self, i: int, buf: bytes, base: int, tail_len: int) -> Hit | None:
        rx = self._m._each[i]
        pos = max(0, self._last_end.get(i, 0) - base)
        found = rx.search(buf, pos)
        # A match wholly inside the carried tail was in the previous write and
        # has been seen; step past it (the tail is short, so this is bounded).
        while found is not None and found.end() <= tail_len:
            found = rx.search(buf, found.start() + 1)
        if found is None:
            return None
        start, end = found.start(), found.end()
        self._last_end[i] = base + end
        return Hit(rule=self._m.rules[i], stream=self._m.stream, offset=base + start,
                   excerpt=excerpt(buf, start, end))


def excerpt(buf: bytes, start: int, end: int) -> str:
    """The match with EXCERPT_CONTEXT characters either side, safe to print on a terminal."""
    if end - start > EXCERPT_MATCH_MAX:
        half = EXCERPT_MATCH_MAX // 2
        middle = (_text(buf[start:start + half]) + " [...] " + _text(buf[end - half:end]))
    else:
        middle = _text(buf[start:end])
    # Four bytes per character at most: enough bytes for the context, then
    # cut by characters once decoded.
    before = _text(buf[max(0, start - 4 * EXCERPT_CONTEXT):start])
    after = _text(buf[end:end + 4 * EXCERPT_CONTEXT])
    return (escape(before[-EXCERPT_CONTEXT:]) + escape(middle)
            + escape(after[:EXCERPT_CONTEXT]))


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    """Escape control and other non-printing characters (terminal escapes, bidi overrides).

    The excerpt is the agent's own text: printed raw by `agentctl events`, an
    ESC sequence or U+202E could rewrite what the operator sees.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return "".join(out)
