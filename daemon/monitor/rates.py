"""Rates over a window of time, from counts taken at each sample.

A rate measured over the gap between two samples is not a rate: an agent
that starts its three processes in the 80 ms before its first sample looks
like a fork storm of 38 per second. So a rate here is always the growth of a
cumulative count over a window of at least the rule's length:

    rate(W) = (count now - count at the newest sample at least W ago) / span

where span is how long ago that sample was (W or a little more, never less).
An agent younger than W is measured from its launch (count 0) and divided by
W, not by its age: ten processes in its first tenth of a second are ten per
W, as they would be later in its life. A fork storm is therefore seen at the
first sample after it starts, and a healthy start-up never looks like one.
"""

from __future__ import annotations

from collections import deque

MIN_WINDOW_S = 1.0
MAX_WINDOW_S = 60.0


class CountHistory:
    """One agent's cumulative count at each sample, kept as long as the longest window."""

    def __init__(self, born: float, keep_s: float) -> None:
        """born: when the count was 0 (the launch), on the monotonic clock."""
        self._keep_s = keep_s
        self._points: deque[tuple[float, int]] = deque([(born, 0)])

    def add(self, at: float, total: int) -> None:
        """Record the count at monotonic time `at` (times must not go backwards)."""
        self._points.append((at, total))
        # Keep one point at or before the longest window's start, drop older ones.
        horizon = at - self._keep_s
        while len(self._points) > 2 and self._points[1][0] <= horizon:
            self._points.popleft()

    def flat(self) -> bool:
        """Whether the count is the same at every point kept: then every rate is 0."""
        return self._points[0][1] == self._points[-1][1]

    def rate(self, window_s: float) -> float:
        """Per second over the last window_s seconds up to the newest point (see module doc)."""
        now, total = self._points[-1]
        ref_at, ref_total = self._points[0]
        for at, count in self._points:
            if at > now - window_s:
                break
            ref_at, ref_total = at, count
        span = max(window_s, now - ref_at)
        return (total - ref_total) / span
