"""The enforcement loop's deadlines: a heap with stale entries, judged by what expires.

The loop thread is never started: _pop_expired and _next_wait are called
with a chosen `now`, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

from typing import Any, cast

from daemon.supervisor.agent import Agent
from daemon.supervisor.enforcer import Enforcer


class _Fake:
    def __init__(self, agent_id: str) -> None:
        self.id = agent_id
        self.kill_requested = False
        self.is_ended = False


def _agent(agent_id: str) -> Agent:
    return cast(Agent, _Fake(agent_id))


def _enforcer() -> Enforcer:
    return Enforcer(lambda expired: None, reactor_tick=lambda: 0.0, tick_s=0.1)


def _ids(expired: list[tuple[Any, str, float]]) -> list[tuple[str, str, float]]:
    return [(a.id, kind, at) for a, kind, at in expired]


def test_deadlines_expire_in_order_and_only_once() -> None:
    e = _enforcer()
    a, b, c = _agent("a"), _agent("b"), _agent("c")
    e.set(c, "lease", 30.0)
    e.set(a, "lease", 10.0)
    e.set(b, "max_runtime", 20.0)
    e.set(b, "lease", 20.0)
    assert e._pop_expired(9.99) == []
    assert _ids(e._pop_expired(20.0)) == [("a", "lease", 10.0), ("b", "max_runtime", 20.0),
                                          ("b", "lease", 20.0)]
    assert e._pop_expired(25.0) == []
    assert _ids(e._pop_expired(100.0)) == [("c", "lease", 30.0)]
    assert e._pop_expired(1000.0) == []


def test_a_renewal_moves_the_deadline_and_the_old_one_is_ignored() -> None:
    e = _enforcer()
    a = _agent("a")
    e.set(a, "lease", 10.0)
    assert e.renew(a, 50.0)
    assert e._pop_expired(20.0) == []
    assert _ids(e._pop_expired(50.0)) == [("a", "lease", 50.0)]
    # Shortened: the earlier deadline holds, the later entry is stale.
    e.set(a, "lease", 80.0)
    assert e.renew(a, 60.0)
    assert _ids(e._pop_expired(70.0)) == [("a", "lease", 60.0)]
    assert e._pop_expired(90.0) == []


def test_a_cleared_agent_never_expires() -> None:
    e = _enforcer()
    a, b = _agent("a"), _agent("b")
    e.set(a, "lease", 10.0)
    e.set(a, "max_runtime", 15.0)
    e.set(b, "lease", 12.0)
    e.clear(a)
    assert e.remaining(a, "lease") is None
    assert _ids(e._pop_expired(100.0)) == [("b", "lease", 12.0)]


def test_a_renewal_of_an_agent_being_ended_is_refused() -> None:
    e = _enforcer()
    a = _agent("a")
    e.set(a, "lease", 10.0)
    cast(_Fake, a).kill_requested = True
    assert not e.renew(a, 50.0)
    assert _ids(e._pop_expired(10.0)) == [("a", "lease", 10.0)]


def test_the_wait_is_until_the_earliest_live_deadline_at_most_a_tick() -> None:
    e = _enforcer()
    a, b = _agent("a"), _agent("b")
    assert e._next_wait(0.0) == 0.1
    e.set(a, "lease", 5.0)
    e.set(b, "lease", 5.05)
    assert e._next_wait(0.0) == 0.1
    assert abs(e._next_wait(5.0) - 0.0) < 1e-9
    e.clear(a)  # its entry is stale now: b's deadline rules
    assert abs(e._next_wait(5.0) - 0.05) < 1e-9
    assert e._next_wait(6.0) == 0.0


def test_many_renewals_do_not_grow_the_heap_without_bound() -> None:
    e = _enforcer()
    agents = [_agent(f"a{i}") for i in range(10)]
    for a in agents:
        e.set(a, "lease", 1.0)
    for round_ in range(1000):
        for a in agents:
            assert e.renew(a, 2.0 + round_)
    assert len(e._heap) <= 2 * 10 + 64 + 1
    assert sorted(a.id for a, _, _ in e._pop_expired(10_000.0)) == sorted(a.id for a in agents)
