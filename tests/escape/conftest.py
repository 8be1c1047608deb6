"""Fixtures of the escape suite: a daemon holding secrets, a bystander agent, the table.

Every technique runs as an agent of one daemon per module (auto cgroup mode)
under the daemon's default profile. A bystander agent, started first, must
run on untouched; the daemon must keep answering; nothing may appear on the
host; every agent must die with the kill. The session ends with the table
of techniques tried and contained.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agentd.v1 import agentd_pb2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import ROOT_REASON
from tests.escape import host, runner
from tests.harness import (
    HOSTILE_MARK,
    VIEWED_PARENT,
    Daemon,
    alive,
    code_parent,
    pids_in,
    wait_for,
)

# One tag per session: every file an escape program creates carries it, so
# the host can be searched for what got out (and cleaned up).
TAG = f"agentd-escape-{uuid.uuid4().hex[:8]}"
# In the daemon's environment, never to be seen by an agent.
CANARY = f"canary-{uuid.uuid4().hex}"
# Host directories searched for tagged files after each technique.
_HOST_DIRS = ("/", "/tmp", "/var/tmp", "/srv", "/dev/shm", "/etc", "/usr", "/usr/local", "/root",
              "/run", "/home", "/var/lib", "/nonexistent")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_sandbox: contained only by the sandbox (skipped when the host "
        "cannot sandbox: no bwrap, or user namespaces off; failed when it can and the daemon "
        "reports no sandbox)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if runner.TABLE:
        terminalreporter.write_sep("=", "escape techniques tried and contained")
        terminalreporter.write_line(runner.render_table(runner.TABLE))


# ------------------------------------------------------------------ the daemon
@dataclass
class Secrets:
    """The daemon and the paths an agent must never read."""

    daemon: Daemon
    private_key: Path
    guardian_pid: int | None

    def paths(self) -> dict[str, str]:
        """Every file under the daemon's directory, labelled, sockets aside."""
        out = {}
        for path in sorted(self.daemon.dir.rglob("*")):
            if path.is_file() and not path.is_socket():
                out[str(path.relative_to(self.daemon.dir))] = str(path)
        return out


@pytest.fixture(scope="module")
def escape_daemon() -> Iterator[Secrets]:
    """A dev daemon whose directory holds a private key (0600), with a canary in its env.

    It lives under /etc, which the sandbox shows read-only (the rest of the
    host is out of the view: a daemon there would be out of sight for free), in a
    world-searchable parent, so that only the daemon's own permissions (its
    directory 0750, its files 0600) and the sandbox's hiding stand between an
    agent and its state, as in a deployment (/var/lib/agentd, /etc/agentd).
    A policy directory with one profile (0644) is there too.
    """
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    root = Path(tempfile.mkdtemp(prefix="agentd-t-escape-", dir=VIEWED_PARENT))
    os.chmod(root, 0o755)
    dev = root / "dev"
    dev.mkdir(mode=0o750)
    key = dev / "operator_ed25519"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    os.chmod(key, 0o600)
    (dev / "policies").mkdir(mode=0o755)
    (dev / "policies" / "escape-suite.toml").write_text('description = "escape suite"\n')
    os.chmod(dev / "policies" / "escape-suite.toml", 0o644)
    saved = {k: os.environ.get(k) for k in ("AGENTD_ESCAPE_CANARY", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(dict.fromkeys(saved, CANARY))
    try:
        daemon = Daemon(dev, mode="auto").start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    info = daemon.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
    match = re.search(r"pid (\d+)", info.guardian)
    yield Secrets(daemon, key, int(match.group(1)) if match else None)
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def programs() -> Iterator[Path]:
    """The escape programs in a world-readable directory (named for the leak check).

    Under the test daemons' code root: each agent binds it read-only (runner.launch).
    """
    d = Path(tempfile.mkdtemp(prefix=HOSTILE_MARK + "escape-", dir=code_parent()))
    runner.install_programs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ the bystander
@dataclass
class Bystander:
    """An ordinary agent started before the techniques; it must not notice them."""

    daemon: Daemon
    programs: Path
    agent: agentd_pb2.Agent = field(default_factory=agentd_pb2.Agent)
    pids: list[int] = field(default_factory=list)
    generation: int = 0

    @property
    def tag(self) -> str:
        return f"{TAG}-bystander"

    def start(self) -> None:
        self.generation += 1
        self.agent = runner.launch(self.daemon, self.programs, f"bystander-{self.generation}",
                                   "bystander.py", {"tag": self.tag})
        runner.wait_report(self.daemon, self.agent, until="ready", timeout=30)
        assert wait_for(lambda: self.beats() >= 1, 10), "the bystander does not beat"
        self.agent = self.daemon.get(self.agent.name)
        self.pids = sorted(pids_in(self.agent.cgroup_paths[0]))

    def beats(self) -> int:
        found = re.findall(r"^beat (\d+)$", runner.output(self.agent), re.MULTILINE)
        return int(found[-1]) if found else -1

    def problems(self) -> list[str]:
        """What differs from a bystander running untouched."""
        now = self.daemon.get(self.agent.name)
        out = []
        if now.state != agentd_pb2.AGENT_STATE_RUNNING:
            out.append(f"bystander state {agentd_pb2.AgentState.Name(now.state)} "
                       f"({now.end_reason}, signal {now.exit_signal})")
            return out
        members = sorted(pids_in(self.agent.cgroup_paths[0]))
        if members != self.pids:
            out.append(f"bystander processes changed: {self.pids} -> {members}")
        for pid in members:
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat[stat.rindex(")") + 2] in "tT":
                    out.append(f"bystander process {pid} is stopped")
        before = self.beats()
        if not wait_for(lambda: self.beats() > before, 5):
            out.append(f"bystander stopped beating at {before}")
        return out

    def restart_if_hurt(self) -> None:
        """A technique that hurt the bystander failed its test; the next gets a fresh one."""
        if self.agent.name and not self.problems():
            return
        if self.agent.name:
            with contextlib.suppress(Exception):
                self.daemon.kill(self.agent.name)
        self.start()


_BWRAP = "/usr/bin/bwrap"
# Each sysctl, at this value, forbids unprivileged user namespaces, which
# bwrap needs: Debian's and Ubuntu's knob, and user_namespaces(7)'s limit.
_USERNS_OFF = {"/proc/sys/kernel/unprivileged_userns_clone": "0",
               "/proc/sys/user/max_user_namespaces": "0"}


def host_cannot_sandbox() -> str:
    """Why this host cannot sandbox agents at all (no bwrap, user namespaces off), or "".

    Found by the test itself, never asked of the daemon: a daemon whose
    sandbox broke must fail the escape tests here, not skip them.
    """
    if not os.access(_BWRAP, os.X_OK):
        return f"{_BWRAP} is not installed"
    for path, off in _USERNS_OFF.items():
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip() == off:
                return f"{path} is {off}: unprivileged user namespaces are off"
    return ""


@pytest.fixture(scope="module")
def bystander(escape_daemon: Secrets, programs: Path) -> Iterator[Bystander]:
    why = host_cannot_sandbox()
    if why:
        pytest.skip(f"agents cannot be sandboxed on this host: {why}")
    b = Bystander(escape_daemon.daemon, programs)
    b.start()
    yield b
    problems = runner.end_agent(b.daemon, b.daemon.get(b.agent.name))
    assert not problems, problems


def sandbox_missing(agent: agentd_pb2.Agent) -> str:
    """Why the daemon's agents are not sandboxed, from the daemon's own report ("" if they are).

    The launched agent's Agent.sandbox lists each restriction as verified
    from outside after launch; a daemon without the sandbox reports none.
    """
    if agent.HasField("sandbox") and agent.sandbox.checks:
        return ""
    return ("the daemon reports no sandbox for its agents (Agent.sandbox has no restriction "
            "checks)")


@pytest.fixture(autouse=True)
def _sandbox_or_skip(request: pytest.FixtureRequest) -> None:
    """needs_sandbox: skip where the host cannot sandbox; fail where it can but the daemon did not.

    (Where it cannot, the bystander fixture has already skipped.)
    """
    if request.node.get_closest_marker("needs_sandbox") is None:
        return
    b: Bystander = request.getfixturevalue("bystander")
    why = sandbox_missing(b.daemon.get(b.agent.name))
    if why:
        runner.TABLE.append(runner.Row(_technique(request.node.name), 0, 0,
                                       note="FAILED: no sandbox"))
        pytest.fail(f"{why}, on a host that can sandbox (bwrap installed, user namespaces "
                    "on): this technique is contained only by the sandbox")


def _technique(test_name: str) -> str:
    """test_fork_bomb -> "fork bomb"; test_x_y[z] -> "x y [z]"."""
    base, bracket, param = test_name.removeprefix("test_").partition("[")
    return base.replace("_", " ") + (f" [{param}" if bracket else "")


# ------------------------------------------------------------------ one technique
_names = itertools.count()


@dataclass
class Escape:
    """One technique's run: launch its agents, judge them, check nothing else was hurt."""

    secrets: Secrets
    programs: Path
    bystander: Bystander
    technique: str
    agents: list[agentd_pb2.Agent] = field(default_factory=list)
    launched: dict[str, host.Launched] = field(default_factory=dict)

    @property
    def daemon(self) -> Daemon:
        return self.secrets.daemon

    @property
    def tag(self) -> str:
        return f"{TAG}-" + re.sub(r"[^a-z0-9]+", "-", self.technique).strip("-")

    def run(self, program: str, targets: dict[str, object], *, name: str = "",
            pids: int = 0, memory: int = 0, scratch_bytes: int | None = None,
            ) -> agentd_pb2.Agent:
        """Launch program as a new agent; targets always carry this technique's tag."""
        name = name or f"esc-{program.removesuffix('.py').replace('_', '-')}-{next(_names)}"
        agent = runner.launch(self.daemon, self.programs, name, program,
                              {"tag": self.tag, **targets}, pids=pids, memory=memory,
                              scratch_bytes=scratch_bytes)
        self.agents.append(agent)
        launched = self.launched[agent.name] = host.Launched.capture(agent)
        # Every host-side check below reads the sandbox's processes: without
        # them found, each would pass on nothing.
        assert launched.sandbox_ns and launched.in_sandbox_pidns(), (
            f"{name}: the host finds no sandbox init (NSpid ending in 1) among "
            f"{sorted(launched.pids)}")
        return agent

    def report(self, agent: agentd_pb2.Agent, timeout: float = 60.0) -> runner.Report:
        return runner.wait_report(self.daemon, agent, timeout=timeout)

    def host_leaks(self) -> list[str]:
        """Files carrying this technique's tag anywhere the host keeps them."""
        roots = [*map(Path, _HOST_DIRS)]
        deep = [self.programs, self.daemon.dir.parent]
        found = [str(p) for d in roots if d.is_dir()
                 for p in _safe_iterdir(d) if self.tag in p.name]
        found += [str(p) for d in deep for p in _safe_rglob(d) if self.tag in p.name]
        return found

    def conclude(self, report: runner.Report | None, verdicts: runner.Verdicts,
                 extra: list[str] | None = None) -> None:
        """Record the row, end every agent, check the rest of the host; fail with everything.

        verdicts: each attempt's (runner.verdicts). extra: problems the test
        found itself.
        """
        contained = verdicts.contained
        escaped = tuple(name for name, ok in contained.items() if not ok)
        runner.TABLE.append(runner.Row(self.technique, len(contained),
                                       len(contained) - len(escaped), escaped,
                                       host_checked=len(verdicts.host_checked)))
        problems = list(extra or [])
        problems += [f"escaped: {line}" for line in runner.describe(report or runner.Report(),
                                                                    verdicts)]
        if not contained:
            problems.append("no attempt was reported")
        problems += self.check_host()
        assert not problems, f"{self.technique}:\n  " + "\n  ".join(problems)

    def check_host(self) -> list[str]:
        """Daemon alive and answering, bystander untouched, agents gone, nothing left behind."""
        d = self.daemon
        problems = []
        if d.proc is None or d.proc.poll() is not None:
            return ["the daemon died"]
        try:
            info = d.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
            if info.host_id != d.host_id:
                problems.append(f"daemon host id changed to {info.host_id}")
        except Exception as err:  # any RPC failure is the finding
            problems.append(f"the daemon does not answer Info: {err}")
        if self.secrets.guardian_pid and not alive(self.secrets.guardian_pid):
            problems.append("the guardian died")
        problems += self.bystander.problems()
        for agent in self.agents:
            problems += runner.end_agent(d, d.get(agent.name))
        problems += [f"on the host: {p}" for p in self.host_leaks()]
        return problems

    def cleanup(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                self.daemon.kill(agent.name)
        for path in self.host_leaks():
            with contextlib.suppress(OSError):
                Path(path).unlink()


def _safe_iterdir(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError:
        return []


def _safe_rglob(d: Path, limit: int = 20000) -> list[Path]:
    out: list[Path] = []
    with contextlib.suppress(OSError):
        for top, dirs, files in os.walk(d):
            out += [Path(top, n) for n in (*dirs, *files)]
            if len(out) > limit:
                break
    return out


@pytest.fixture
def escape(request: pytest.FixtureRequest, escape_daemon: Secrets, programs: Path,
           bystander: Bystander) -> Iterator[Escape]:
    """This test's technique, with a bystander known to be running untouched before it."""
    bystander.restart_if_hurt()
    e = Escape(escape_daemon, programs, bystander, _technique(request.node.name))
    yield e
    e.cleanup()
    # Give the next technique a clean slate even when this one failed midway.
    deadline = time.monotonic() + 10
    while any(pids_in(a.cgroup_paths[0]) for a in e.agents) and time.monotonic() < deadline:
        time.sleep(0.05)
