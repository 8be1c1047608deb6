"""Prometheus metrics, derived from the audit log, served where the config says.

Counters and the kill-latency histogram are fed by an audit-log listener,
so they count exactly what the audit log records (and nothing is counted
twice on a code path that forgets to call a metric). Gauges that describe
the present (agents by state, the latch, the enforcement loop's liveness)
are computed at scrape time from the supervisor.

Everything lives in a private registry: the process-wide default registry
would also export whatever any imported library put there.

The endpoint has no authentication: it is off unless ``metrics_listen``
names a loopback ``HOST:PORT`` (another host needs ``metrics_allow_remote``)
or ``unix:/PATH``, a socket of mode 0660 with the control socket's group.
A metrics endpoint that cannot be bound is logged and left off: the kill
switch must not fail to start over its metrics.
"""

from __future__ import annotations

import contextlib
import grp
import http.server
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.config import Config, metrics_address
from daemon.supervisor.agent import State

if TYPE_CHECKING:
    from daemon.supervisor.core import Supervisor

log = logging.getLogger(__name__)

# From a single cgroup.kill (about 0.2 ms, FIELD-NOTES) to a stop that used
# a long grace period.
KILL_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                       1.0, 2.5, 5.0, 10.0)
# A scraper that connects and says nothing holds the (single) serving thread
# this long at most.
_REQUEST_TIMEOUT_S: Final = 5.0


class Metrics:
    """agentd's metrics in a private registry. Feed it audit records with :meth:`record`."""

    def __init__(self) -> None:
        """Create every metric; gauges read the supervisor once :meth:`attach` gives it."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.kills = Counter(
            "agentd_kills", "Agents killed or stopped, by what ended them and how",
            ["action", "method"], registry=r)
        self.kill_duration = Histogram(
            "agentd_kill_duration_seconds",
            "From acceptance (lease: from the deadline) until the kernel reported the "
            "agent's cgroup empty; stops include their grace period",
            ["action"], buckets=KILL_BUCKETS, registry=r)
        self.rejected = Counter(
            "agentd_commands_rejected", "Signed commands refused, by reason",
            ["reason"], registry=r)
        self.tripwire_hits = Counter(
            "agentd_tripwire_hits", "Tripwire rules that fired, by rule", ["rule"], registry=r)
        self.lease_expiries = Counter(
            "agentd_lease_expiries", "Agents killed because their lease ran out", registry=r)
        self.egress_flows = Counter(
            "agentd_egress_flows", "Allowlist agents' connections and lookups as agentd's "
            "proxy ended them, by verdict and path", ["verdict", "via"], registry=r)
        self.egress_bytes = Counter(
            "agentd_egress_bytes", "Bytes through agentd's egress proxy, by direction "
            "(out: from agents)", ["direction"], registry=r)
        self._sup: Supervisor | None = None
        # What a kill of a whole batch (estop, leases, shutdown) used; from daemon_start.
        self._kill_method = "unknown"
        r.register(_PresentCollector(self))

    def attach(self, sup: Supervisor) -> None:
        """Read the agents, the latch and the enforcement loop from *sup* at scrape time."""
        self._sup = sup

    @property
    def supervisor(self) -> Supervisor | None:
        """The supervisor gauges are read from, once attached."""
        return self._sup

    def record(self, rec: dict[str, Any]) -> None:
        """Count one audit record. The audit log's listener: never raises."""
        try:
            self._record(rec)
        except Exception:
            log.exception("metrics: cannot count audit record %s", rec.get("event"))

    def _kill(self, action: str, method: object, duration_ms: object = None) -> None:
        self.kills.labels(action, str(method or self._kill_method)).inc()
        if isinstance(duration_ms, int | float):
            self.kill_duration.labels(action).observe(duration_ms / 1000)

    def _record(self, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        if event == "daemon_start":
            self._kill_method = str(rec.get("kill_method") or "unknown")
        elif event == "command" and rec.get("decision") == "rejected":
            self.rejected.labels(str(rec.get("error_reason") or "unknown")).inc()
        elif event == "commands_rejected_summary":
            # Refusals past the audit's rate, counted (daemon.commands.rejections).
            for entry in rec.get("by") or []:
                self.rejected.labels(str(entry.get("reason") or "unknown")).inc(
                    int(entry.get("count") or 0))
        elif event == "result":
            action = rec.get("action")
            if action in ("stop", "kill") and not rec.get("already_ended"):
                self._kill(str(action), rec.get("method"), rec.get("duration_ms"))
            elif action == "estop":
                n = int(rec.get("agents_killed") or 0)
                if n:
                    self.kills.labels("estop", self._kill_method).inc(n)
                    self.kill_duration.labels("estop").observe(
                        float(rec.get("duration_ms") or 0) / 1000)
        elif event in ("egress_flow", "egress_dns"):
            if rec.get("phase") != "open":
                self.egress_flows.labels(str(rec.get("verdict") or "?"),
                                         str(rec.get("via") or "?")).inc()
                for direction in ("out", "in"):
                    moved = rec.get(f"bytes_{direction}")
                    if isinstance(moved, int) and moved > 0:
                        self.egress_bytes.labels(direction).inc(moved)
        elif event == "lease_expired":
            self.lease_expiries.inc()
            self._kill("lease", None, rec.get("deadline_to_empty_ms"))
        elif event == "agent_killed_by_daemon" and not rec.get("already_ended"):
            # The reason is "tripwire:RULE" and the like: its prefix is the
            # action (bounded), the rule is counted by agentd_tripwire_hits.
            action = str(rec.get("reason") or "daemon").split(":", 1)[0]
            self._kill(action, rec.get("method"), rec.get("duration_ms"))
        elif event == "max_runtime_reached" and not rec.get("already_ended"):
            self._kill("max_runtime", rec.get("method"), rec.get("duration_ms"))
        elif event == "agent_killed_at_shutdown":
            self._kill("shutdown", None)
        elif event == "leftover_agent_killed":
            self._kill("leftover", None)
        elif event in ("tripwire", "tripwire_suppressed"):
            # Tripwires audit one record per rule and agent per second; the
            # hits in between are in "suppressed", either on the next record
            # or on a tripwire_suppressed record. Each hit counts once.
            hits = int(rec.get("suppressed") or 0) + (event == "tripwire")
            if hits:
                self.tripwire_hits.labels(str(rec.get("rule") or "unknown")).inc(hits)


class _PresentCollector(Collector):
    """Gauges computed at scrape time: they describe now, not a history."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        agents = GaugeMetricFamily("agentd_agents", "Agents the daemon knows, by state",
                                   labels=["state"])
        latched = GaugeMetricFamily("agentd_estop_latched",
                                    "1 while an emergency stop is latched (runs refused)")
        tick_age = GaugeMetricFamily(
            "agentd_enforcer_last_tick_age_seconds",
            "Seconds since the enforcement loop (leases, run-time limits) last ticked")
        sup = self._metrics.supervisor
        if sup is not None:
            counts = dict.fromkeys(State, 0)
            for a in sup.agents():
                counts[a.state] = counts.get(a.state, 0) + 1
            for state, n in counts.items():
                agents.add_metric([state.value], n)
            latched.add_metric([], 1.0 if sup.latch.latched else 0.0)
            tick_age.add_metric([], max(0.0, time.monotonic() - sup.enforcer.last_tick))
        return [agents, latched, tick_age]


# ----------------------------------------------------------------- serving
class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics (or /): the registry in Prometheus text format."""

    timeout = _REQUEST_TIMEOUT_S
    server: _HasRegistry

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The base writes every request to stderr, and its address_string()
        # fails for a Unix-socket peer (which has no address).
        log.debug("metrics: " + format, *args)


class _HasRegistry(socketserver.BaseServer):
    registry: CollectorRegistry


class _TCPServer(socketserver.TCPServer, _HasRegistry):
    allow_reuse_address = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.UnixStreamServer, _HasRegistry):
    pass


class MetricsServer:
    """The metrics endpoint: one thread serving one request at a time."""

    def __init__(self, server: _HasRegistry, where: str, socket_path: Path | None) -> None:
        """Use :func:`serve`."""
        self._server = server
        self.where = where
        self._socket_path = socket_path
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="agentd-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close the socket, and remove a Unix socket file.

        Waits at most about two seconds: shutdown() waits for a request in
        progress, and a scraper that trickles its request in must not keep
        the daemon from exiting (the serving thread is a daemon thread).
        """
        stopper = threading.Thread(target=self._server.shutdown, name="agentd-metrics-stop",
                                   daemon=True)
        stopper.start()
        stopper.join(timeout=2.0)
        self._server.server_close()
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()


def serve(metrics: Metrics, cfg: Config) -> MetricsServer | None:
    """Serve *metrics* where cfg.metrics_listen says; None if it is off or cannot bind.

    Raises ConfigError for a malformed or non-loopback address (already
    refused when the config was loaded).
    """
    where = metrics_address(cfg.metrics_listen, allow_remote=cfg.metrics_allow_remote,
                            source="metrics_listen")
    if where is None:
        return None
    try:
        if isinstance(where, Path):
            server: _HasRegistry = _bind_unix(where, cfg.socket_group)
            url = f"unix:{where}"
        else:
            tcp = _bind_tcp(*where)
            host, port = str(tcp.server_address[0]), int(tcp.server_address[1])
            server = tcp
            url = f"http://[{host}]:{port}/metrics" if ":" in host else \
                f"http://{host}:{port}/metrics"
    except OSError as err:
        log.error("metrics: cannot serve on %s: %s; continuing without metrics",
                  cfg.metrics_listen, err)
        return None
    server.registry = metrics.registry
    log.info("metrics on %s", url)
    return MetricsServer(server, url, where if isinstance(where, Path) else None)


def _bind_tcp(host: str, port: int) -> _TCPServer:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    cls = _TCP6Server if family == socket.AF_INET6 else _TCPServer
    return cls((str(addr[0]), int(addr[1])), _Handler)


def _bind_unix(path: Path, group_name: str) -> _UnixServer:
    """Bind a Unix socket of mode 0660, group *group_name* if it exists. Raises OSError."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()  # stale, from a daemon that died
    elif path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    # umask before bind: the socket is created with its final mode, never
    # briefly accessible to everyone.
    old = os.umask(0o117)
    try:
        server = _UnixServer(str(path), _Handler)
    finally:
        os.umask(old)
    try:
        os.chmod(path, 0o660)
        with contextlib.suppress(KeyError):
            os.chown(path, 0, grp.getgrnam(group_name).gr_gid)
    except BaseException:
        server.server_close()
        raise
    return server


__all__ = ["KILL_BUCKETS", "Metrics", "MetricsServer", "serve"]
