"""agentd: entry point. `agentd --config PATH` or `agentd --dev DIR`."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

from agentd.v1 import agentd_pb2
from systemd.daemon import notify as sd_notify

from daemon import __version__, children, config, hostid, journal, metrics, strictmodes
from daemon.api.lanes import Lanes
from daemon.api.server import ApiServer, prepare_socket_dir
from daemon.api.servicer import Servicer, timestamp
from daemon.audit import AuditLog
from daemon.auth import Limits, ReplayCache, TrustStoreFile
from daemon.cgroups.layout import discover
from daemon.cgroups.tree import FALLBACK_METHOD, KILL_METHOD, AgentTree
from daemon.commands.context import Ctx
from daemon.commands.gate import CommandGate
from daemon.commands.recorder import Recorder
from daemon.commands.rejections import Rejections
from daemon.errors import AgentdError, ConfigError, ReplayCacheIOError
from daemon.events import EventBus
from daemon.monitor import rules as tripwire_rules
from daemon.supervisor.core import Supervisor
from daemon.supervisor.guardian_link import Guardian, import_reports

log = logging.getLogger("agentd")

# How often expired replay-cache entries are dropped (at most; sooner when the
# window is shorter). Rarely: each prune that drops something rewrites the file.
_REPLAY_PRUNE_S = 60.0


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agentd", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="TOML configuration file")
    src.add_argument("--dev", type=Path, metavar="DIR",
                     help="zero-setup local daemon with everything under DIR")
    p.add_argument("--user", help="(dev) user agents run as; default: a dynamic uid")
    p.add_argument("--cgroup-mode", choices=["auto", "v2", "hybrid"],
                   help="override the detected cgroup layout")
    p.add_argument("--cgroup-name", help="name of the daemon's cgroup subtree")
    p.add_argument("--force-kill-fallback", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kill-verify-timeout", type=float, help=argparse.SUPPRESS)
    p.add_argument("--guardian-timeout", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _load_config(a: argparse.Namespace) -> config.Config:
    overrides: dict[str, object] = {}
    if a.cgroup_mode:
        overrides["cgroup_mode"] = a.cgroup_mode
    if a.cgroup_name:
        overrides["cgroup_name"] = a.cgroup_name
    if a.force_kill_fallback:
        overrides["force_kill_fallback"] = True
    if a.kill_verify_timeout is not None:
        overrides["kill_verify_timeout_s"] = a.kill_verify_timeout
    if a.guardian_timeout is not None:
        overrides["guardian_timeout_s"] = a.guardian_timeout
    if a.dev is not None:
        if a.config is None and a.dev.exists() and not a.dev.is_dir():
            raise ConfigError(f"{a.dev} exists and is not a directory")
        return config.dev(a.dev, user=a.user, **overrides)
    cfg = replace(config.load(a.config), **overrides)  # type: ignore[arg-type]
    config.check(cfg, str(a.config))
    return cfg


def _prepare_dirs(cfg: config.Config) -> None:
    if cfg.dev:
        cfg.socket_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        # Again, now that DIR exists and before root writes or chmods
        # anything there: someone may have made it (or a symlink) first.
        strictmodes.check(cfg.socket_path.parent)
        os.chmod(cfg.socket_path.parent, 0o750)  # noqa: S103 - the socket gate
        if not cfg.trust_store.exists():
            fd = os.open(cfg.trust_store,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.write(fd, b"# PRINCIPAL ROLES ssh-ed25519 BASE64KEY [COMMENT]\n"
                         b"# ROLES: comma-separated subset of admin,operator,oncall\n")
            os.close(fd)
    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)


def _notify(msg: str) -> None:
    """sd_notify when run under systemd (NOTIFY_SOCKET set); a no-op elsewhere."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    sd_notify(msg)


def _raise_nofile() -> None:
    """Raise the soft open-files limit to the hard one.

    Each agent costs the daemon about five descriptors (two output pipes, two
    log files, a pidfd); 1024, a common default soft limit, would cap a host
    at about 200 agents. Agents get their own limit back in the shim.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(cfg: config.Config) -> int:
    if os.geteuid() != 0:
        raise ConfigError("agentd must run as root: it owns cgroups and drops agents' privileges")
    _raise_nofile()
    # Orphans of agents' trees (bwrap's inner process after a kill) come to
    # the daemon, which reaps them (daemon.children), not to the host's init.
    children.become_subreaper()
    # A thread waiting for the interpreter after a syscall waits up to one
    # switch interval (5 ms by default) while others run Python. The kill
    # paths make a syscall or two per agent; with a thousand agents being
    # reaped at once, 5 ms a turn became a 200 ms late lease kill.
    sys.setswitchinterval(0.0005)
    _prepare_dirs(cfg)
    host_id, created = hostid.load_or_create(cfg.state_dir, cfg.host_id)
    audit = AuditLog.open(cfg.audit_log)
    # Listeners first: every later record of this run (leftover kills,
    # daemon_start...) reaches the event bus, the metrics and the journal.
    events = EventBus()
    meters = metrics.Metrics()
    for listener in (events.publish, meters.record, journal.log_audit_record):
        audit.add_listener(listener)
    limits = Limits(
        max_envelope_bytes=cfg.max_envelope_bytes,
        max_signatures=cfg.max_signatures,
        max_lifetime_s=cfg.max_command_lifetime_s,
        clock_skew_s=cfg.clock_skew_s,
    )
    # After a lost cache, refuse what is not a stop until no command signed
    # before the loss can still be valid: one issued at now + skew (the
    # future edge verify() accepts) is valid until lifetime + 2 x skew from
    # now (RFC 4120 section 3.2.3's rule, with the skew on both ends).
    replay = ReplayCache.open(
        cfg.replay_path, now=time.time(),
        window_s=cfg.max_command_lifetime_s + 2 * cfg.clock_skew_s, fresh=created,
    )
    trust = TrustStoreFile(cfg.trust_store)
    layout = discover(cfg.cgroup_mode)
    tree = AgentTree(layout, cfg.cgroup_name, force_fallback=cfg.force_kill_fallback)
    recorder = Recorder(audit, replay, Rejections())
    gate = CommandGate(trust=trust, replay=replay, recorder=recorder, host_id=host_id,
                       limits=limits)
    rules = tripwire_rules.for_config(cfg.rules_file)
    sup = Supervisor(cfg, tree, audit, rules=rules)
    # Flows and lookups of allowlist agents: events and metrics, not audit
    # records (denied ones are audited too, rate-limited: daemon.supervisor.egress).
    for listener in (events.publish, meters.record):
        sup.egress.add_listener(listener)
    recorder.retry(sup.latch.retry)
    recorder.start()
    meters.attach(sup)
    leftovers = sup.start()
    # Reports a guardian left when it killed agents of an earlier run.
    imported = import_reports(cfg.state_dir, audit)
    guardian: Guardian | None = None
    if cfg.guardian_timeout_s > 0:
        guardian = Guardian.start(cgroup_base=tree.base_v2, report_dir=cfg.state_dir,
                                  timeout_s=cfg.guardian_timeout_s,
                                  force_fallback=cfg.force_kill_fallback)
        sup.enforcer.add_heartbeat(guardian.beat)
        sup.attach_guardian(guardian.acted)
    kill_method = KILL_METHOD if tree.has_cgroup_kill else FALLBACK_METHOD

    def info() -> agentd_pb2.InfoResponse:
        _, head = audit.head
        msg = agentd_pb2.InfoResponse(
            host_id=host_id, version=__version__,
            max_command_lifetime_s=int(cfg.max_command_lifetime_s),
            clock_skew_s=int(cfg.clock_skew_s), cgroup_mode=layout.mode.value,
            kill_method=kill_method, audit_head=head, audit_records=audit.records,
            audit_log=str(cfg.audit_log),
            guardian=guardian.status() if guardian is not None else "off",
        )
        latch = sup.latch.state
        msg.estop_latched = latch is not None
        if latch is not None:
            msg.latched_at.CopyFrom(timestamp(latch.at))
            msg.latch_reason = f"{latch.reason} (by {latch.by})"
        msg.reset_signatures_required = cfg.reset_signatures
        msg.lease_required = cfg.require_lease
        msg.default_lease_ms = int(cfg.default_lease_s * 1000)
        if replay.degraded_until and replay.degraded_until > time.time():
            msg.replay_degraded_until.CopyFrom(timestamp(replay.degraded_until))
        return msg

    audit.append(
        "daemon_start", version=__version__, pid=os.getpid(), host_id=host_id,
        cgroup_mode=layout.mode.value, kill_method=kill_method,
        cgroup_base=str(tree.base_v2), leftover_agents_killed=leftovers,
        replay_degraded_until=replay.degraded_until, guardian_imported_reports=imported,
    )
    lanes = Lanes(recorder)
    servicer = Servicer(Ctx(sup, gate, recorder, cfg), lanes, info, events=events)
    server = ApiServer(servicer, lanes, socket_path=cfg.socket_path,
                       gid=prepare_socket_dir(cfg.socket_path, cfg.socket_group),
                       stop_socket=(cfg.stop_socket_path, prepare_socket_dir(
                           cfg.stop_socket_path, cfg.stop_socket_group)),
                       max_connections=cfg.max_connections,
                       last_tick=lambda: sup.enforcer.last_tick, on_stop=events.close)
    server.start()
    # Heartbeats only while a kill would be served now (daemon.api.standard).
    sup.enforcer.add_liveness("API self-probe", server.probe.fresh)
    metrics_server = metrics.serve(meters, cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("agentd %s ready: socket %s (emergency %s), host id %s, cgroups %s (%s), "
             "kill by %s", __version__, cfg.socket_path, cfg.stop_socket_path, host_id,
             layout.mode.value, tree.base_v2, kill_method)
    for controller in sup.unenforceable_defaults():
        log.warning("default %s limit cannot be enforced: no cgroup hierarchy offers the %s "
                    "controller to agentd", controller, controller)
    if replay.degraded_until:
        log.warning("replay cache lost or corrupt: only stop, kill and estop are accepted "
                    "for %.0f s", replay.degraded_until - time.time())
    status = sup.status_line()
    _notify(f"READY=1\nSTATUS={status}")
    # Pruned from this idle loop, not the enforcement loop: that one kills
    # on lease expiry, and must never wait for a file rewrite.
    prune_every = min(_REPLAY_PRUNE_S, cfg.max_command_lifetime_s + cfg.clock_skew_s)
    next_prune = time.monotonic() + prune_every
    while not stop.wait(timeout=1.0):
        # systemctl status shows this line: keep it current for the human.
        if (now_status := sup.status_line()) != status:
            status = now_status
            _notify(f"STATUS={status}")
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + prune_every
            _prune_replay(replay)
    _notify("STOPPING=1\nSTATUS=killing agents and shutting down")
    server.stop(grace=1.0).wait(2.0)
    killed = sup.shutdown()
    lanes.close()
    if guardian is not None:
        # Only now: the agents are dead, so the guardian may stand down.
        guardian.quit()
    audit.append("daemon_stop", pid=os.getpid(), agents_killed=killed)
    # Last records: refusals still queued or counted, whatever waits for the disk.
    recorder.stop()
    if metrics_server is not None:
        # Last: a scraper mid-request must not delay the agents' kills.
        metrics_server.stop()
    log.info("agentd stopped; %d running agent(s) killed", killed)
    return 0


def _prune_replay(replay: ReplayCache) -> None:
    """Drop expired replay entries; a failed rewrite loses nothing, so it is only logged."""
    try:
        dropped = replay.prune(time.time())
    except ReplayCacheIOError as err:
        log.warning("%s", err.message)
        return
    if dropped:
        log.debug("replay cache: %d expired entr(ies) dropped", dropped)


def main(argv: list[str] | None = None) -> None:
    journal.configure_logging()
    try:
        a = _args(argv)
        cfg = _load_config(a)
        sys.exit(run(cfg))
    except (ConfigError, AgentdError) as err:
        print(f"agentd: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
