"""Parse what operators type and format what they read: durations, sizes, CPUs, tables.

Parsers raise ValueError with a message fit to show after the option name;
agentctl.params turns it into a usage error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
# Binary multiples, as cgroup's memory.max and systemd's MemoryMax= read them.
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)", re.IGNORECASE)
_CPUS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(m?)")


def parse_duration(text: str) -> float:
    """Parse ``500ms``, ``5s``, ``2m``, ``1h`` or a sum like ``1m30s`` into seconds.

    A unit is required: a bare ``5`` could mean seconds or milliseconds.
    Raises ValueError.
    """
    s = text.strip().lower()
    parts = _DURATION_PART.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        if re.fullmatch(r"\d+(\.\d+)?", s):
            raise ValueError(f"{text!r} needs a unit: {s}s, {s}ms, {s}m or {s}h")
        raise ValueError(f"{text!r} is not a duration (examples: 500ms, 5s, 2m, 1h, 1m30s)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_size(text: str) -> int:
    """Parse a byte count: ``1048576``, ``64K``, ``512M``, ``1G``, ``1.5G``.

    Suffixes are binary (K = 1024). Raises ValueError for anything else, for
    zero and for sizes beyond 64 bits.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 64K, 512M, 1G)")
    number, unit = m.groups()
    if "." in number and not unit:
        raise ValueError(f"{text!r}: a byte count must be a whole number")
    size = math.floor(float(number) * _SIZE_UNITS[unit.upper()])
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0 (omit the option for the default)")
    if size > _UINT64_MAX:
        raise ValueError(f"{text!r} is too large")
    return size


def parse_cpus(text: str) -> int:
    """Parse a CPU limit, ``0.5`` CPUs or ``500m`` (millicores), into thousandths of a CPU.

    Raises ValueError for zero, negative, below 0.001 CPU or absurd values.
    """
    m = _CPUS.fullmatch(text.strip().lower())
    if m is None or ("." in m[1] and m[2]):
        raise ValueError(f"{text!r} is not a CPU count (examples: 0.5, 2, 250m)")
    millis = int(m[1]) if m[2] else round(float(m[1]) * 1000)
    if millis <= 0:
        raise ValueError(f"{text!r} must be at least 0.001 CPU (1m)")
    if millis > _UINT32_MAX:
        raise ValueError(f"{text!r} is too large")
    return millis


# -------------------------------------------------------------- formatting
def format_duration(seconds: float) -> str:
    """Format a span for people: ``850ms``, ``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s".replace(".0s", "s")
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def format_ms(ms: float) -> str:
    """Format a kill's duration: ``0.2 ms``, ``58.3 ms``, ``5.01 s``."""
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def format_bytes(n: int) -> str:
    """Format a byte count with binary suffixes, as parse_size reads them: ``512M``, ``1.5G``."""
    for unit in ("T", "G", "M", "K"):
        size = _SIZE_UNITS[unit]
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + unit
    return f"{n}B"


def format_cpus(millis: int) -> str:
    """Format thousandths of a CPU as CPUs: ``0.5``, ``2``."""
    return f"{millis / 1000:g}"


def format_time(when: datetime, now: datetime | None = None) -> str:
    """Format a UTC time with how long ago it was: ``2025-03-01 12:00:00Z (3m12s ago)``."""
    text = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if now is None:
        return text
    delta = (now - when).total_seconds()
    rel = f"{format_duration(delta)} ago" if delta >= 0 else f"in {format_duration(-delta)}"
    return f"{text} ({rel})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render rows as left-aligned columns two spaces apart, without trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)
