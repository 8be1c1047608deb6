"""The event bus: recent audit records as events, for `agentctl events` and its followers.

Fed by an audit-log listener, so every event is a record that is already
durable in the hash-chained log. The bus keeps the last
:data:`RING_SIZE` events in memory (nothing is written: the audit log is the
record) and hands them to subscribers.

Two rules shape it. Publishing runs on the thread that appended the audit
record, which may be the one that just killed an agent, so it is O(1) per
subscriber and never blocks on a subscriber nor raises. And a slow
subscriber must not hold memory without bound: each has a bounded queue, and
what does not fit is dropped and reported to it as one synthetic
``events_dropped`` event carrying the count.

Order: the audit log calls its listeners after releasing its lock, so two
records appended at the same moment by two threads may reach the bus in
either order. The bus's ``seq`` is the order of publication; the audit
record's own ``seq`` is in ``fields_json``.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self

log = logging.getLogger(__name__)

Kind = Literal["lifecycle", "command", "rule", "watchdog", "daemon", "egress"]

RING_SIZE: Final = 10_000
"""Events kept for the backlog."""
QUEUE_SIZE: Final = 1_000
"""Events a subscriber may fall behind by before the bus drops events for it."""
_MESSAGE_MAX: Final = 300

_KINDS: Final[dict[str, Kind]] = {
    "daemon_start": "lifecycle",
    "daemon_stop": "lifecycle",
    "agent_ended": "lifecycle",
    "agent_killed_at_shutdown": "lifecycle",
    "leftover_agent_killed": "lifecycle",
    "max_runtime_reached": "lifecycle",
    "agent_killed_by_daemon": "lifecycle",
    "command": "command",
    "result": "command",
    "tripwire": "rule",
    "tripwire_suppressed": "rule",
    "detector_verdict": "rule",
    "lease_expired": "watchdog",
    "guardian_killed": "watchdog",
    "guardian_report_unreadable": "watchdog",
    "audit_chain_broken": "watchdog",
    "egress_flow": "egress",
    "egress_dns": "egress",
    "egress_denied": "egress",
    "egress_denied_summary": "egress",
    "egress_restarted": "egress",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One event: an audit record with its kind and a line for humans."""

    seq: int
    at: float  # wall clock, seconds since the epoch
    kind: Kind
    type: str  # the audit event name, or events_dropped
    agent: str
    agent_id: str
    message: str
    fields_json: str

    def concerns(self, agent: str | None) -> bool:
        """True if no agent filter is set, or the event names that agent (by name or id)."""
        return agent is None or agent in (self.agent, self.agent_id)


# ------------------------------------------------------------------ describing
def kind_of(event: str) -> Kind:
    """The kind of an audit event name; ``daemon`` for names not listed."""
    return _KINDS.get(event, "daemon")


def agent_of(record: dict[str, Any]) -> tuple[str, str]:
    """(agent name, agent id) a record concerns; empty strings where it names none."""
    name = record.get("name") or record.get("agent") or ""
    if not name and record.get("event") == "command":
        # An accepted command names its target; estop and reset target "*".
        target = record.get("target") or ""
        name = "" if target == "*" else target
    return str(name), str(record.get("agent_id") or "")


def describe(record: dict[str, Any]) -> str:
    """One line for humans saying what an audit record means.

    Never raises: a record of a shape this module does not know gets a
    generic ``event key=value ...`` line.
    """
    event = str(record.get("event", "?"))
    try:
        describer = _DESCRIBERS.get(event, _generic)
        text = describer(record)
    except Exception:  # a malformed record must not cost the event
        text = _generic(record)
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 3] + "..."


def _generic(r: dict[str, Any]) -> str:
    skip = {"seq", "ts", "event"}
    parts = [f"{k}={v}" for k, v in r.items()
             if k not in skip and isinstance(v, str | int | float | bool) and v != ""]
    return " ".join([str(r.get("event", "?")), *parts])


def _who(r: dict[str, Any]) -> str:
    return str(r.get("name") or r.get("agent_id") or "?")


def _ms(value: Any) -> str:
    return f"{float(value):.1f} ms" if isinstance(value, int | float) else "? ms"


def _daemon_start(r: dict[str, Any]) -> str:
    left = r.get("leftover_agents_killed") or []
    text = f"agentd {r.get('version', '?')} started (pid {r.get('pid', '?')}, " \
           f"{r.get('cgroup_mode', '?')} cgroups, kill by {r.get('kill_method', '?')})"
    if left:
        text += f"; {len(left)} leftover agent(s) of an earlier run killed"
    return text


def _command(r: dict[str, Any]) -> str:
    rpc = r.get("rpc") or r.get("action") or "?"
    if r.get("decision") == "rejected":
        return f"rejected {rpc}: {r.get('error_reason', '?')}: {r.get('error', '')}"
    target = r.get("target") or ""
    text = f"accepted {rpc}{'' if target in ('', '*') else ' ' + str(target)}"
    text += f" by {','.join(r.get('principals') or []) or '?'}"
    if r.get("reason"):
        text += f" ({r['reason']})"
    return text


def _result(r: dict[str, Any]) -> str:
    action = r.get("action")
    if not r.get("ok", True) and r.get("error"):
        return f"{action or 'run'} {r.get('name', '')} failed: {r['error']}"
    if action == "estop":
        return (f"estop: {r.get('agents_killed', 0)} agent(s), {r.get('processes_killed', 0)} "
                f"process(es) killed in {_ms(r.get('duration_ms'))}"
                + ("" if r.get("all_verified_empty", True) else "; SOME PROCESSES STUCK"))
    if action in ("stop", "kill"):
        if r.get("already_ended"):
            return f"{action} {_who(r)}: had already ended"
        text = (f"{action} {_who(r)}: {r.get('processes_killed', 0)} process(es) gone in "
                f"{_ms(r.get('duration_ms'))} by {r.get('method', '?')}")
        return text + (", verified empty" if r.get("verified_empty") else
                       f"; STUCK: {[s.get('pid') for s in r.get('stuck') or []]}")
    if action in ("freeze", "thaw"):
        done = "done" if r.get("verified") else "NOT verified"
        return f"{action} {_who(r)}: {done} in {_ms(r.get('duration_ms'))}"
    if "main_pid" in r:
        return f"run {_who(r)}: started, main pid {r['main_pid']}"
    return _generic(r)


def _agent_ended(r: dict[str, Any]) -> str:
    text = f"{_who(r)} ended: {r.get('state', '?')}"
    if r.get("end_reason"):
        text += f" ({r['end_reason']})"
    if r.get("exit_signal"):
        text += f", signal {r['exit_signal']}"
    elif r.get("exit_code") is not None:
        text += f", exit code {r['exit_code']}"
    if r.get("leftover_processes_killed"):
        text += f", {r['leftover_processes_killed']} leftover process(es) killed"
    if r.get("oom_kills"):
        text += f", {r['oom_kills']} OOM kill(s)"
    return text


def _lease_expired(r: dict[str, Any]) -> str:
    text = f"{_who(r)}: lease expired (ttl {r.get('ttl_ms', '?')} ms); "
    if r.get("verified_empty"):
        return text + f"killed, empty {_ms(r.get('deadline_to_empty_ms'))} after the deadline"
    return text + f"killed but STUCK: {r.get('stuck')}"


def _tripwire(r: dict[str, Any]) -> str:
    text = f"tripwire {r.get('rule', '?')} hit by {_who(r)}: {r.get('action', '?')}"
    if r.get("outcome"):
        text += f" ({r['outcome']})"
    if r.get("suppressed"):
        text += f"; {r['suppressed']} earlier hit(s) not recorded one by one"
    return text


def _egress(r: dict[str, Any]) -> str:
    """One flow or lookup; the names and reasons are the proxy's, addresses as it saw them."""
    where = r.get("name") or r.get("addr") or "?"
    port = f":{r['port']}" if r.get("port") else ""
    verdict = str(r.get("verdict") or "?")
    if r.get("event") == "egress_dns":
        return f"{_who(r)}: DNS {r.get('qtype', '?')} {where} {verdict}: {r.get('reason', '')}"
    if r.get("phase") == "open":
        return f"{_who(r)}: flow to {where}{port} opened (via {r.get('via', '?')})"
    moved = f"{r.get('bytes_out', 0)} B out, {r.get('bytes_in', 0)} B in"
    if verdict == "denied":
        return f"{_who(r)}: flow to {where}{port} DENIED: {r.get('reason', '')}"
    return f"{_who(r)}: flow to {where}{port} closed ({moved}, {r.get('duration_s', 0)} s)"


_DESCRIBERS: Final[dict[str, Callable[[dict[str, Any]], str]]] = {
    "egress_flow": _egress,
    "egress_dns": _egress,
    "egress_denied": lambda r: f"{_who(r)}: egress DENIED to {r.get('name') or r.get('addr')}"
                               f":{r.get('port', '?')}: {r.get('reason', '')}",
    "egress_denied_summary": lambda r: f"{_who(r)}: {r.get('count')} more egress attempt(s) "
                                       f"denied in {r.get('window_s')} s (not audited one by one)",
    "daemon_start": _daemon_start,
    "daemon_stop": lambda r: f"agentd stopped; {r.get('agents_killed', 0)} running agent(s) "
                             "killed",
    "command": _command,
    "result": _result,
    "agent_ended": _agent_ended,
    "agent_killed_at_shutdown": lambda r: f"{_who(r)} killed at daemon shutdown"
                                          + ("" if r.get("verified_empty") else " (STUCK)"),
    "leftover_agent_killed": lambda r: f"leftover agent {r.get('agent_id', '?')} of an earlier "
                                       f"run killed ({r.get('processes_killed', 0)} process(es))",
    "max_runtime_reached": lambda r: f"{_who(r)}: max run time "
                                     f"({r.get('max_runtime_ms', '?')} ms) reached; stopped",
    "agent_killed_by_daemon": lambda r: f"{_who(r)} killed by the daemon: {r.get('reason', '?')}",
    "lease_expired": _lease_expired,
    "guardian_killed": lambda r: f"the guardian killed agents of a dead daemon "
                                 f"(report {r.get('report', '?')})",
    "guardian_report_unreadable": lambda r: f"guardian report {r.get('report', '?')} "
                                            f"unreadable: {r.get('error', '?')}",
    "audit_chain_broken": lambda r: "AUDIT CHAIN BROKEN: a new chain started; the old log is "
                                    f"at {r.get('broken_log')} "
                                    f"({r.get('problems_total', '?')} problem(s))",
    "tripwire": _tripwire,
    "tripwire_suppressed": lambda r: f"tripwire {r.get('rule', '?')}: "
                                     f"{r.get('suppressed', '?')} more hit(s) by {_who(r)}",
    "detector_verdict": lambda r: f"detector on {_who(r)}: {r.get('verdict', '?')}"
                                  + (f" ({r['reason']})" if r.get("reason") else ""),
}


def to_event(seq: int, record: dict[str, Any]) -> Event:
    """Build the event for an audit record. Never raises."""
    event = str(record.get("event", "?"))
    agent, agent_id = agent_of(record)
    ts = record.get("ts")
    return Event(
        seq=seq,
        at=float(ts) if isinstance(ts, int | float) else time.time(),
        kind=kind_of(event),
        type=event,
        agent=agent,
        agent_id=agent_id,
        message=describe(record),
        # default=str: a field the audit log could serialise but json cannot
        # (it never should) must not cost the event.
        fields_json=json.dumps(record, sort_keys=True, default=str),
    )


# ------------------------------------------------------------------ the bus
class Subscription:
    """One subscriber's view: the backlog it asked for, then new events.

    Use as a context manager (or call :meth:`close`) so the bus forgets it.
    Only the subscriber's thread calls :meth:`next`.
    """

    def __init__(self, bus: EventBus, backlog: list[Event], agent: str | None,
                 queue_size: int) -> None:
        """Made by :meth:`EventBus.subscribe`."""
        self._bus = bus
        self._backlog = collections.deque(backlog)
        self.agent = agent
        self._queue: collections.deque[Event] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        # Events dropped since the last one delivered: count, first and last seq.
        self._dropped = 0
        self._dropped_first = 0
        self._dropped_last = 0

    @property
    def closed(self) -> bool:
        """True once closed by the subscriber or by the bus."""
        return self._closed

    def _offer(self, event: Event) -> None:
        """Queue an event, or count it dropped if the queue is full. Never blocks for long."""
        if not event.concerns(self.agent):
            return
        with self._cond:
            if self._closed:
                return
            if len(self._queue) >= self._queue_size:
                if not self._dropped:
                    self._dropped_first = event.seq
                self._dropped += 1
                self._dropped_last = event.seq
                return
            if self._dropped:
                # The marker goes where the gap is, before what follows it.
                self._queue.append(self._drop_marker())
            self._queue.append(event)
            self._cond.notify()

    def _drop_marker(self) -> Event:
        """The synthetic events_dropped event; resets the count. Call under the lock."""
        fields = {"event": "events_dropped", "dropped": self._dropped,
                  "first_seq": self._dropped_first, "last_seq": self._dropped_last}
        marker = Event(
            seq=self._dropped_last, at=time.time(), kind="daemon", type="events_dropped",
            agent="", agent_id="",
            message=f"{self._dropped} event(s) dropped (seq {self._dropped_first}.."
                    f"{self._dropped_last}): this reader fell more than {self._queue_size} "
                    "behind; the audit log has them all",
            fields_json=json.dumps(fields, sort_keys=True),
        )
        self._dropped = 0
        return marker

    def next(self, timeout: float) -> Event | None:
        """The next event, waiting up to *timeout* seconds; None if none came or closed."""
        if self._backlog:
            return self._backlog.popleft()
        with self._cond:
            if not self._queue and not self._dropped and not self._closed:
                self._cond.wait(timeout)
            if self._queue:
                return self._queue.popleft()
            if self._dropped:
                return self._drop_marker()
            return None

    def close(self) -> None:
        """Stop receiving events and wake a waiting :meth:`next`. Idempotent."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._bus._forget(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class EventBus:
    """Recent events in a ring, and the subscribers to new ones. Thread-safe."""

    def __init__(self, ring_size: int = RING_SIZE, queue_size: int = QUEUE_SIZE) -> None:
        """An empty bus keeping the last *ring_size* events."""
        self._ring: collections.deque[Event] = collections.deque(maxlen=ring_size)
        self._subs: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, record: dict[str, Any]) -> None:
        """Add an audit record as an event and hand it to every subscriber.

        The audit log's listener: never raises and never blocks on a
        subscriber (each offer is a bounded deque append).
        """
        try:
            self._publish(record)
        except Exception:
            log.exception("event bus: cannot publish %s", record.get("event"))

    def _publish(self, record: dict[str, Any]) -> None:
        with self._lock:
            # The seq is taken under the lock, so ring order is seq order.
            event = to_event(next(self._seq), record)
            self._ring.append(event)
            subs = list(self._subs)
        for sub in subs:
            sub._offer(event)

    def subscribe(self, backlog: int = 0, agent: str | None = None,
                  *, follow: bool = True) -> Subscription:
        """Subscribe: the last *backlog* events (of *agent*, if given), then new ones.

        No event is both in the backlog and delivered live, and none falls
        between. With follow=False the subscription holds the backlog only.
        A closed bus gives a closed subscription (its backlog, then None).
        """
        with self._lock:
            # list(deque) is one C-level copy; the filtering happens outside
            # the lock so a large backlog does not hold up publishers.
            recent = list(self._ring) if backlog > 0 else []
            sub = Subscription(self, [], agent or None, self._queue_size)
            if follow and not self._closed:
                self._subs.add(sub)
            else:
                sub._closed = True
        if recent:
            matching = [e for e in recent if e.concerns(sub.agent)]
            sub._backlog.extend(matching[-backlog:])
        return sub

    def _forget(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        """End every subscription (their streams finish) and accept no new followers.

        Publishing still fills the ring. Called when the API stops.
        """
        with self._lock:
            self._closed = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()


__all__ = ["Event", "EventBus", "Kind", "Subscription", "describe", "kind_of", "to_event"]
