"""An agent's launch inside its sandbox, and the checks from outside once it runs.

The supervisor's half of daemon.sandbox: it turns a checked RunSpec into
the shim's command (bwrap and its options), the agent's environment and the
descriptors bwrap needs, and after the spawn it waits for the agent's own
first process and reads its restrictions back from the kernel.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.cgroups.tree import AgentCgroup
from daemon.config import Config
from daemon.errors import LaunchFailed
from daemon.sandbox import bwrap, seccomp, verify
from daemon.sandbox.bwrap import SCRATCH, TMP, Hidden
from daemon.sandbox.policy import agent_env
from daemon.supervisor.egress import PROXY_ENV, AgentEgress
from daemon.supervisor.reactor import LogSink
from daemon.supervisor.runspec import RunSpec
from daemon.users import AgentUser

# How long bwrap may take to build the sandbox and exec the agent.
START_TIMEOUT_S = 10.0
_STATUS_CAP = 4096


def hidden(cfg: Config) -> list[Hidden]:
    """The daemon's files no agent may see: state (logs included), trust store, audit, socket,
    policies, and the tripwire rules (which say what an agent's output must avoid)."""
    paths: list[tuple[Path, bool]] = [
        (cfg.state_dir, False), (cfg.trust_store, True), (cfg.audit_log, True),
        (cfg.socket_path, True), (cfg.stop_socket_path, True), (cfg.policy_dir, False)]
    if cfg.rules_file:
        # Its whole directory where that is the daemon's own (as for the
        # trust store): a file-only mask is lost when an editor renames a
        # new version over the file, which detaches mounts on it elsewhere.
        paths.append((Path(cfg.rules_file), True))
    if cfg.dev:
        paths.append((cfg.state_dir.parent, False))
    return bwrap.hidden_paths(paths)


class StatusSink(LogSink):
    """Collects bwrap's --json-status-fd output (a few hundred bytes) until EOF.

    Drained by the reactor like the output pipes, so the pipe is read until
    bwrap's outer process exits: a closed read end would turn bwrap's last
    status write into SIGPIPE, and the agent's main process would die of it.
    """

    def __init__(self) -> None:  # no file: nothing of LogSink's is used
        self.data = b""
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self.data = (self.data + data)[:_STATUS_CAP]

    def close(self) -> None:
        self.closed.set()

    def exec_happened(self) -> bool:
        """bwrap writes "exit-code" only once it had exec'd the agent (bwrap(1))."""
        with self._lock:
            return b'"exit-code"' in self.data


@dataclass
class Prepared:
    """What the shim is given: bwrap's argv, the environment, descriptors to keep."""

    argv: list[str]
    env: dict[str, str]
    seccomp_fd: int
    status_r: int
    status_w: int
    view: tuple[bwrap.Mount, ...] = ()  # what the agent's mount namespace must hold
    egress: AgentEgress | None = None
    sink: StatusSink = field(default_factory=StatusSink)

    @property
    def keep_fds(self) -> tuple[int, ...]:
        return (self.seccomp_fd, self.status_w)

    def helper_cmdline(self) -> bytes:
        """What /proc/PID/cmdline shows for bwrap's own processes."""
        return b"".join(a.encode() + b"\0" for a in self.argv)

    def close_ours(self) -> None:
        """Close the daemon's copies of what the shim inherited (after the spawn)."""
        for fd in (self.seccomp_fd, self.status_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_all(self) -> None:
        self.close_ours()
        with contextlib.suppress(OSError):
            os.close(self.status_r)


def prepare(cfg: Config, spec: RunSpec, user: AgentUser, argv: list[str], *,
            name: str, agent_id: str, egress: AgentEgress | None = None) -> Prepared:
    """bwrap's command line and the agent's environment. Raises LaunchFailed.

    argv[0] is replaced by spec.entrypoint.path, the absolute path that was
    resolved and hashed: bwrap then execs that file and searches no PATH.
    egress: an allowlist agent's namespace; its proxy's address goes in the
    environment whatever env_allow says (as AGENTD_* do).
    """
    bwrap.require()
    if not os.path.isabs(spec.entrypoint.path):
        raise LaunchFailed(f"cannot exec {argv[0]}: {spec.entrypoint.error or 'not resolved'}")
    argv = [spec.entrypoint.path, *argv[1:]]
    base = {"PATH": cfg.agent_path, "HOME": SCRATCH, "USER": user.login, "LOGNAME": user.login,
            "LANG": "C.UTF-8", "TMPDIR": TMP}
    own = {"AGENTD_AGENT_NAME": name, "AGENTD_AGENT_ID": agent_id}
    if egress is not None:
        own.update(PROXY_ENV)
    env = agent_env(spec.profile, base, spec.env, own)
    # AF_UNIX wherever the host's network is not the agent's (seccomp.py).
    fd = seccomp.bpf_fd(deny_unix=spec.profile.network != "host")
    try:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
    except OSError as err:
        os.close(fd)
        raise LaunchFailed(f"cannot make bwrap's status pipe: {err.strerror}") from err
    view = tuple(bwrap.view(spec.profile, hidden=hidden(cfg), uid=user.uid,
                            gids=(user.gid, *user.groups)))
    cmd = bwrap.argv(spec.profile, argv, seccomp_fd=fd, uid=user.uid, mounts=view,
                     omit=cfg.sandbox_test_omit)
    cmd[-len(argv) - 1:-len(argv) - 1] = ["--json-status-fd", str(status_w)]
    return Prepared(argv=cmd, env=env, seccomp_fd=fd, status_r=status_r, status_w=status_w,
                    view=view, egress=egress)


@dataclass(frozen=True)
class Inspection:
    checks: list[verify.Check]
    helpers: frozenset[int]  # bwrap's outer process and its init


def inspect(group: AgentCgroup, main_pid: int, prepared: Prepared, spec: RunSpec, *,
            user: AgentUser, stderr_log: Path) -> Inspection:
    """Wait for the agent's own first process, then check every restriction from outside.

    Raises LaunchFailed when bwrap ended without starting the agent, or
    did not start it within START_TIMEOUT_S.
    """
    t0 = time.monotonic()
    pids = verify.wait_for_agent(group, main_pid, prepared.helper_cmdline(), START_TIMEOUT_S)
    want = verify.Expected(uid=user.uid, gid=user.gid, groups=user.groups,
                           network=spec.profile.network, nofile=spec.profile.nofile,
                           limits=spec.limits, view=prepared.view,
                           netns_inode=prepared.egress.net.inode if prepared.egress else 0)
    if pids is None:
        # Not seen: the main process ended first, or the timeout passed.
        prepared.sink.closed.wait(1.0)
        if not prepared.sink.exec_happened():
            waited = time.monotonic() - t0
            raise LaunchFailed(
                f"the sandbox did not start the agent ({waited:.1f}s): "
                f"{_bwrap_message(stderr_log)}")
        checks = verify.check(group, main_pid, [], want)
        return Inspection(checks=checks, helpers=frozenset({main_pid}))
    helper = prepared.helper_cmdline()
    helpers = frozenset({main_pid, *(p for p in pids if verify.cmdline(p) == helper)})
    return Inspection(checks=verify.check(group, main_pid, pids, want), helpers=helpers)


def _bwrap_message(stderr_log: Path, wait: float = 1.0) -> str:
    """bwrap's own error line from the agent's stderr log (it dies before the agent exists)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            lines = stderr_log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        said = [line for line in lines if line.startswith("bwrap: ")]
        if said:
            return bwrap.describe_failure(said[-1])
        if time.monotonic() >= deadline:
            return f"bwrap failed or hung; see {stderr_log}"
        time.sleep(0.01)


def report(spec: RunSpec, user: AgentUser, checks: list[verify.Check],
           view: tuple[bwrap.Mount, ...] = ()) -> verify.Report:
    p = spec.profile
    return verify.Report(policy=p.name, network=p.network, user=user.name,
                         scratch_bytes=p.scratch_bytes, entrypoint=spec.entrypoint.path,
                         entrypoint_sha256=spec.entrypoint.sha256, looser=spec.looser,
                         checks=tuple(checks), view=view)
