"""Refused commands: audited one by one up to a rate, then as counted summaries.

A client that can reach the socket needs no key to send garbage. Each
refusal used to be an fsync'd record and a head-file rewrite: 4 processes
sending 500 a second grew the log by 11 MiB in 20 s, about 45 GiB a day
(issue 10). Here a token bucket lets a burst of refusals be recorded one by
one (what an operator debugging a misconfigured signer needs); past it,
refusals are counted by reason and by who (the signer's principal when the
signature checked out, else the first key id's hint), and one summary
record per window says how many, with a sample of the first. Every refusal
is counted exactly once: individually, or in one summary.

Nothing here does I/O: records wait in a queue for the recorder thread
(take()), so refusing a command never waits on the disk, and never on a
lock the disk holds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# One by one: a burst of 20, then one every 10 s (360 an hour). Past that,
# one summary a minute: about 420 records an hour of flood, measured at
# ~540 KiB an hour (benchmarks/stop_under_load.py), under its 1 MiB target.
BURST = 20
RATE_PER_S = 0.1
SUMMARY_EVERY_S = 60.0
# Distinct (reason, who) pairs a summary counts separately; the rest are "other".
MAX_KEYS = 32


@dataclass
class _Window:
    started: float
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    total: int = 0
    sample: dict[str, Any] | None = None


class Rejections:
    """The policy above, for one daemon. Thread-safe; note() never blocks on I/O."""

    def __init__(self, *, burst: int = BURST, rate_per_s: float = RATE_PER_S,
                 summary_every_s: float = SUMMARY_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._burst, self._rate, self._every = burst, rate_per_s, summary_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._refilled = clock()
        self._window: _Window | None = None
        self._queue: deque[tuple[str, dict[str, Any], Future[None]]] = deque()
        self.counted = 0  # refusals folded into summaries, since start

    def note(self, fields: dict[str, Any], *, reason: str, who: str) -> Future[None] | None:
        """Record one refusal; returns a future done once its own record is written.

        None when the refusal was counted into a summary instead (its record
        comes with the summary).
        """
        now = self._clock()
        with self._lock:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                done: Future[None] = Future()
                self._queue.append(("command", fields, done))
                return done
            w = self._window
            if w is None:
                w = self._window = _Window(started=now)
            key = (reason, who) if (reason, who) in w.counts or len(w.counts) < MAX_KEYS \
                else ("other", "other")
            w.counts[key] = w.counts.get(key, 0) + 1
            w.total += 1
            if w.sample is None:
                w.sample = fields
            self.counted += 1
        return None

    def take(self, *, final: bool = False) -> list[tuple[str, dict[str, Any], Future[None]]]:
        """The records to write now: queued ones, and a summary once its window is over.

        final: close the summary window whatever its age (at shutdown).
        """
        now = self._clock()
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
            w = self._window
            if w is not None and (final or now - w.started >= self._every):
                self._window = None
                by = [{"reason": r, "who": who, "count": n}
                      for (r, who), n in sorted(w.counts.items(), key=lambda kv: -kv[1])]
                summary = {"decision": "rejected", "window_s": round(now - w.started, 3),
                           "count": w.total, "by": by, "sample": w.sample}
                out.append(("commands_rejected_summary", summary, Future()))
        return out
