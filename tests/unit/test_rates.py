"""Rates over whole windows (daemon.monitor.rates), on explicit times."""

from __future__ import annotations

import pytest

from daemon.monitor.rates import CountHistory


def test_a_healthy_start_up_is_not_a_burst() -> None:
    """Three processes in the 80 ms before the first sample: 3 per second, not 37.5."""
    h = CountHistory(born=100.0, keep_s=1.0)
    h.add(100.08, 3)
    assert h.rate(1.0) == pytest.approx(3.0)


def test_a_storm_at_start_up_is_seen_at_the_first_sample() -> None:
    h = CountHistory(born=100.0, keep_s=1.0)
    h.add(100.2, 60)
    assert h.rate(1.0) == pytest.approx(60.0)


def test_the_rate_is_measured_over_at_least_the_window() -> None:
    h = CountHistory(born=0.0, keep_s=5.0)
    for i in range(1, 51):  # one sample every 0.2 s, one new process each
        h.add(i * 0.2, i)
    # Samples every 0.2 s: the newest at least 1 s old is exactly 1 s old.
    assert h.rate(1.0) == pytest.approx(5.0)
    assert h.rate(5.0) == pytest.approx(5.0)


def test_a_burst_fades_from_a_short_window_but_not_a_long_one() -> None:
    h = CountHistory(born=0.0, keep_s=5.0)
    h.add(1.0, 0)
    h.add(2.0, 30)  # 30 processes between 1 s and 2 s
    for t in range(3, 7):
        h.add(float(t), 30)
    assert h.rate(1.0) == 0.0
    assert h.rate(5.0) == pytest.approx(30 / 5)


def test_a_sparse_sample_divides_by_the_real_span() -> None:
    """Samples 3 s apart (a slow sweep): the rate is over 3 s, never over less than 1."""
    h = CountHistory(born=0.0, keep_s=1.0)
    h.add(3.0, 30)
    h.add(6.0, 60)
    assert h.rate(1.0) == pytest.approx(10.0)


def test_history_is_bounded_by_the_longest_window() -> None:
    h = CountHistory(born=0.0, keep_s=2.0)
    for i in range(1, 10001):
        h.add(i * 0.01, i)
    assert len(h._points) <= 2 / 0.01 + 2
    assert h.rate(2.0) == pytest.approx(100.0)


def test_a_flat_history_has_every_rate_zero() -> None:
    h = CountHistory(born=0.0, keep_s=5.0)
    h.add(1.0, 0)
    assert h.flat() and h.rate(1.0) == 0.0
    h.add(2.0, 3)
    assert not h.flat()
    for t in range(3, 9):
        h.add(float(t), 3)
    # The start-up fell out of the longest window: flat again, and so every rate.
    assert h.flat() and h.rate(1.0) == h.rate(5.0) == 0.0
