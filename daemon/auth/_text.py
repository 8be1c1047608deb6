"""Formatting helpers for error messages: one line, bounded, UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def clip(value: str | bytes, limit: int = 80) -> str:
    """repr() of an untrusted value, shortened so a message stays one short line.

    repr() escapes newlines and control characters, so a client cannot forge
    extra lines in a log.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if len(value) > limit:
        return repr(value[:limit]) + "..."
    return repr(value)


def iso_utc(t: float) -> str:
    """UTC ISO 8601 time of unix seconds `t`; an absurd value is shown as raw seconds."""
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f} (unix seconds)"
