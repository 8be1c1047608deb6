"""Allowlist agents' egress: their namespaces, agentd's proxy, and what it saw.

The supervisor's half of daemon.egress. At launch it makes the agent's
network namespace (probed before the agent exists) and hands its sockets
to the egress service, a separate process, so that a bulk transfer never
competes for this process's interpreter lock with a kill. After a kill or a
freeze it closes the agent's flows, never before: the kill is written first
and this only sends a datagram that cannot block. What the service saw
(every flow, allowed or denied, every lookup) comes back as events: counted
on the agent (its signals and tripwires read them), kept as its recent
flows (status), published to event followers and metrics; denied attempts
are also audited, as rate-limited summaries under a flood (bounded disk).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.audit import AuditLog
from daemon.config import Config, resolver_address
from daemon.egress import netns
from daemon.egress.allowlist import Allowlist
from daemon.egress.control import EgressError, EgressService
from daemon.errors import LaunchFailed

log = logging.getLogger(__name__)

RECENT_FLOWS = 32
# Denied attempts audited one by one per agent and minute; past that, one
# summary a minute with the count (and every one still counts and shows).
AUDIT_BURST = 20
AUDIT_WINDOW_S = 60.0
_PING_TIMEOUT_S = 5.0
PROXY_ENV = {
    **{k: netns.PROXY_URL for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                    "http_proxy", "https_proxy", "all_proxy")},
    "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
}

Listener = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class AgentEgress:
    """One agent's egress state; counters change on the service's event thread."""

    agent_id: str
    name: str
    net: netns.AgentNet
    allow: tuple[str, ...]
    byte_cap: int
    cut: bool = False
    denied: int = 0
    bytes_total: int = 0
    flows_open: int = 0
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_FLOWS))
    # Audit rate limit for denied attempts.
    window_start: float = 0.0
    audited: int = 0
    suppressed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recent_flows(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.recent)


class Egress:
    """Every allowlist agent's egress, and the one service process that carries it."""

    def __init__(self, cfg: Config, audit: AuditLog) -> None:
        self.cfg = cfg
        self.audit = audit
        self._agents: dict[str, AgentEgress] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._service: EgressService | None = None
        self._start_lock = threading.Lock()

    def add_listener(self, fn: Listener) -> None:
        """fn(record) for every flow and lookup (event followers, metrics). Must not block."""
        self._listeners.append(fn)

    # -------------------------------------------------------------- launch
    def service(self) -> EgressService:
        """The running service, started on first use. Raises LaunchFailed."""
        with self._start_lock:
            if self._service is None:
                resolvers = [resolver_address(r, source="config") for r in
                             self.cfg.egress_resolvers]
                svc = EgressService(resolvers=resolvers,
                                    private_ok=list(self.cfg.egress_private_ranges_ok),
                                    on_event=self._on_event)
                try:
                    svc.start()
                except (OSError, EgressError) as err:
                    raise LaunchFailed(f"cannot start agentd's egress proxy: "
                                       f"{getattr(err, 'strerror', None) or err}") from err
                self._service = svc
            return self._service

    def launch(self, agent_id: str, name: str, allow: tuple[str, ...],
               byte_cap: int) -> AgentEgress:
        """Make, probe and hand over the agent's namespace. Raises LaunchFailed."""
        svc = self.service()
        if not svc.ping(_PING_TIMEOUT_S):
            raise LaunchFailed("agentd's egress proxy did not answer; no allowlist agent "
                               "can start until it does (see the daemon's log)")
        try:
            net = netns.create()
        except netns.NetnsError as err:
            raise LaunchFailed(f"network allowlist: {err}") from err
        state = AgentEgress(agent_id=agent_id, name=name, net=net, allow=allow,
                            byte_cap=byte_cap)
        with self._lock:
            self._agents[agent_id] = state
        try:
            svc.add(agent_id, name, Allowlist.of(allow), dict(net.fds), byte_cap=byte_cap)
        except (OSError, ValueError, EgressError) as err:
            self.forget(agent_id)
            raise LaunchFailed(f"cannot hand the agent's sockets to the egress proxy: "
                               f"{err}") from err
        return state

    # --------------------------------------------------- after kill/freeze
    def close_flows(self, agent_id: str) -> None:
        """Close every flow of the agent now (after its kill or freeze). Never raises."""
        svc = self._service
        if svc is None or agent_id not in self._agents:
            return
        try:
            svc.cut(agent_id, empty=False)
        except Exception:
            log.exception("egress: closing the flows of %s", agent_id)

    def cut(self, agent_id: str) -> bool:
        """Close every flow, empty the allowlist (a signed cut); False: no allowlist agent."""
        with self._lock:
            state = self._agents.get(agent_id)
        if state is None:
            return False
        with state.lock:
            state.cut = True
            state.allow = ()
        svc = self._service
        if svc is not None:
            svc.cut(agent_id, empty=True)
        return True

    def forget(self, agent_id: str) -> None:
        """The agent ended: close its flows and sockets, flush its audit summary."""
        with self._lock:
            state = self._agents.pop(agent_id, None)
        if state is None:
            return
        svc = self._service
        if svc is not None:
            with contextlib.suppress(Exception):
                svc.remove(agent_id)
        self._flush(state, time.monotonic(), force=True)
        state.net.close()

    def get(self, agent_id: str) -> AgentEgress | None:
        with self._lock:
            return self._agents.get(agent_id)

    def stop(self) -> None:
        svc, self._service = self._service, None
        if svc is not None:
            svc.stop()
        with self._lock:
            states = list(self._agents.values())
            self._agents.clear()
        for state in states:
            state.net.close()

    # -------------------------------------------------------------- events
    def _on_event(self, ev: dict[str, Any]) -> None:
        """On the service client's thread: count, keep, publish, audit. Never raises."""
        try:
            self._handle(ev)
        except Exception:
            log.exception("egress: handling event %r", ev.get("kind"))

    def _handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "egress_restarted":
            self.audit.append("egress_restarted", agents=len(self._agents))
            return
        state = self.get(str(ev.get("agent", "")))
        if state is None:
            return
        now = time.monotonic()
        if kind == "dropped_events":
            # The service could not send them (a flood): the denials among
            # them still count for tripwires, and show in the audit summary.
            denied = int(ev.get("denied") or 0)
            with state.lock:
                state.denied += denied
                state.suppressed += denied
            return
        denied = (kind == "flow" and ev.get("verdict") == "denied") or (
            kind == "dns" and ev.get("verdict") == "refused")
        record = self._record(state, ev)
        with state.lock:
            if kind == "flow":
                if ev.get("phase") == "open":
                    state.flows_open += 1
                else:
                    if ev.get("verdict") == "allowed":
                        state.flows_open = max(0, state.flows_open - 1)
                    state.bytes_total += int(ev.get("bytes_out") or 0) + int(
                        ev.get("bytes_in") or 0)
            if denied:
                state.denied += 1
            state.recent.append({**record, "at": time.time()})
        for fn in self._listeners:
            fn(record)
        if denied:
            self._audit_denied(state, record, now)

    @staticmethod
    def _record(state: AgentEgress, ev: dict[str, Any]) -> dict[str, Any]:
        kind = ev.get("kind")
        fields = {k: ev.get(k) for k in ("verdict", "reason", "name", "addr", "port", "via",
                                         "phase", "bytes_out", "bytes_in", "duration_s",
                                         "qtype") if ev.get(k) is not None}
        event = "egress_dns" if kind == "dns" else "egress_flow"
        if kind == "dns":
            fields.setdefault("via", "dns")
        return {"event": event, "ts": time.time(), "name": state.name,
                "agent_id": state.agent_id, **fields}

    def _audit_denied(self, state: AgentEgress, record: dict[str, Any], now: float) -> None:
        self._flush(state, now)
        with state.lock:
            if state.audited >= AUDIT_BURST:
                state.suppressed += 1
                return
            state.audited += 1
        fields = {k: v for k, v in record.items() if k not in ("event", "ts")}
        self.audit.append("egress_denied", **fields)

    def _flush(self, state: AgentEgress, now: float, *, force: bool = False) -> None:
        """Start a new audit window if the old one is over; audit what it suppressed."""
        with state.lock:
            if not force and now - state.window_start < AUDIT_WINDOW_S:
                return
            suppressed, state.suppressed = state.suppressed, 0
            state.window_start, state.audited = now, 0
        if suppressed:
            self.audit.append("egress_denied_summary", name=state.name,
                              agent_id=state.agent_id, count=suppressed,
                              window_s=AUDIT_WINDOW_S)
