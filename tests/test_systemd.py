"""agentd deployed as a systemd service (systemd/agentd.service) under a real systemd.

A container boots the host's systemd (tests/systemd/nspawn.py), `make install`
deploys the daemon into it exactly as on a host, and the tests show what the
unit promises: the daemon reports READY and its status; a hung daemon is
killed by the watchdog and restarted; and whatever ends the daemon (the
watchdog, kill -9, systemctl stop) ends its agents too, because they live in
the service's delegated cgroup (systemd.service(5), systemd.kill(5)).

Agents are checked from the host: their host pids are pinned with pidfds the
moment they start, so "dead" means the kernel says so, not the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import pytest
from agentd import signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import config
from tests.harness import REPO, wait_for
from tests.systemd.nspawn import BootFailed, Container, unavailable

UNIT = REPO / "systemd" / "agentd.service"
SHIPPED_CONFIG = REPO / "systemd" / "agentd.toml"
SERVICE_CGROUP = "system.slice/agentd.service"
AGENTCTL = "/opt/agentd/venv/bin/agentctl"
SOCKET = "/run/agentd/agentd.sock"
KEY = "/keys/admin.pem"
# Under a code root of the shipped config (systemd/agentd.toml): agents see
# only /usr and /etc of the host, and get their programs by a read-only bind.
HOSTILE = "/srv/agents/hostile"
# Bounds, from the unit: WatchdogSec=10s, TimeoutAbortSec=5s.
WATCHDOG_S = 10.0
ABORT_S = 5.0

UNAVAILABLE = unavailable()
F = TypeVar("F", bound=Callable[..., None])


def needs_container(test: F) -> F:
    """Root, slow, and skipped with the reason when no container can boot here."""
    for mark in (pytest.mark.root, pytest.mark.slow,
                 pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE or "-")):
        test = mark(test)
    return test


# ----------------------------------------------------------- shipped files
def test_shipped_config_loads_and_documents_every_setting() -> None:
    cfg = config.load(SHIPPED_CONFIG)
    assert cfg.socket_path == Path("/run/agentd/agentd.sock")
    assert cfg.state_dir == Path("/var/lib/agentd")
    assert cfg.trust_store == Path("/etc/agentd/trusted_keys")
    assert cfg.audit_log == Path("/var/log/agentd/audit.log")
    text = SHIPPED_CONFIG.read_text()
    defaults = config.Config()
    for f in fields(config.Config):
        if f.name in ("dev", "extra"):
            continue
        assert re.search(rf"^(# )?{f.name} = ", text, re.M), f"{f.name} is not in agentd.toml"
        # A commented-out line shows the built-in default: it must be the real one.
        m = re.search(rf"^# ({f.name} = .*)$", text, re.M)
        if m:
            shown = tomllib.loads(m.group(1))[f.name]
            default = getattr(defaults, f.name)
            default = list(default) if isinstance(default, tuple) else default  # TOML arrays
            assert shown == (str(default) if isinstance(default, Path) else default), f.name


def test_unit_hardening_directives_are_sorted() -> None:
    """STYLE.md: the hardening block (the last paragraph of [Service]) is sorted."""
    service = UNIT.read_text().split("[Service]")[1].split("\n[")[0]
    block = service.strip().split("\n\n")[-1]
    keys = [line.split("=")[0] for line in block.splitlines() if not line.startswith("#")]
    assert "NoNewPrivileges" in keys
    assert keys == sorted(keys)


# --------------------------------------------------------------- deployment
@dataclass
class Deployment:
    """agentd installed and started as agentd.service inside a booted container."""

    box: Container

    def sh(self, script: str, *, check: bool = True,
           timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.box.sh(script, check=check, timeout=timeout)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.box.run([AGENTCTL, "--socket", SOCKET, "--key", KEY, *args],
                            check=check, timeout=60)

    def ctl_json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ctl("--json", *args).stdout)
        return out

    def show(self, *props: str) -> dict[str, str]:
        out = self.box.run(["systemctl", "show", "agentd.service",
                            *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, since: float) -> str:
        return self.box.run(["journalctl", "--unit=agentd.service", "--no-pager",
                             "--output=cat", f"--since=@{int(since)}"], check=False).stdout

    def ready(self, timeout: float = 30.0) -> None:
        """Bring the service to active (it may be restarting) and answering on its socket."""
        # Forget earlier failures and the start-rate counter: each test provokes restarts.
        self.sh("systemctl reset-failed agentd.service; "
                "systemctl is-active --quiet agentd.service || systemctl start agentd.service",
                check=False, timeout=timeout)
        ok = wait_for(lambda: self.show("ActiveState")["ActiveState"] == "active"
                      and self.ctl("info", check=False).returncode == 0, timeout=timeout,
                      interval=0.2)
        assert ok, "agentd.service is not active:\n" + self.journal(time.time() - 120)

    # ---------------------------------------------------- host-side facts
    @property
    def service_cgroup(self) -> Path:
        return self.box.payload_v2 / SERVICE_CGROUP

    def own_processes(self) -> list[int]:
        """Host pids of the service's own processes (daemon, guardian), not its agents."""
        agents = self.service_cgroup / "agentd"
        pids = []
        for procs in self.service_cgroup.rglob("cgroup.procs"):
            if agents == procs.parent or agents in procs.parents:
                continue
            pids += [int(p) for p in procs.read_text().split()]
        return pids

    def agent_processes(self) -> list[int]:
        """Host pids of every process in the agents' subtree of the service cgroup."""
        return [int(p) for procs in (self.service_cgroup / "agentd").rglob("cgroup.procs")
                for p in procs.read_text().split()]

    def main_pid(self) -> int:
        """The daemon's host pid: the service process whose innermost pid is MainPID."""
        inner = self.show("MainPID")["MainPID"]
        for pid in self.own_processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == inner:
                        return pid
        raise AssertionError(f"MainPID {inner} is not among the service's processes")

    def inside(self, path: str) -> Path:
        """A file of the container, read from the host through its init's root (proc(5))."""
        return Path(f"/proc/{self.box.leader}/root") / path.lstrip("/")

    def run_agent(self, name: str, program: str) -> list[int]:
        """Launch a hostile agent; once it says "ready", pin its processes with pidfds."""
        agent = self.ctl_json("run", "--name", name, "--bind-ro", HOSTILE, "--",
                              "/usr/bin/python3", f"{HOSTILE}/{program}")
        stdout = self.inside(agent["stdout_log"])
        # The hostile programs print "ready" once every process they start is up.
        assert wait_for(lambda: stdout.exists() and "ready" in stdout.read_text(), timeout=10), \
            f"{name} did not get ready"
        cgroup = Path(agent["cgroup_paths"][0])
        pids = _procs(self.box.payload_v2 / cgroup.relative_to("/sys/fs/cgroup"))
        assert pids, f"{name}: no process in its cgroup"
        return _pin(pids)


def _procs(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _all_dead(pidfds: list[int], timeout: float) -> bool:
    """True once every pinned process has exited (a pidfd polls readable on exit)."""
    deadline = time.monotonic() + timeout
    pending = list(pidfds)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(pending, [], [], left)
        pending = [fd for fd in pending if fd not in ready]
    return True


def _pin(pids: list[int]) -> list[int]:
    """pidfds for pids that are still there: a later signal cannot hit a reused pid."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    return fds


def _signal(pidfds: list[int], sig: int) -> None:
    for fd in pidfds:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, sig)


@contextlib.contextmanager
def _pinned(pidfds: list[int]) -> Iterator[list[int]]:
    try:
        yield pidfds
    finally:
        for fd in pidfds:
            os.close(fd)


def _wheelhouse(src: Path, out: Path) -> None:
    """Wheels for the project and its dependencies, so pip in the container needs no index."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for cmd in ([*pip, "wheel", "-q", "-w", str(out), str(src)],
                [*pip, "download", "-q", "-d", str(out), "setuptools>=68", "wheel"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}"


def _admin_key(keys: Path) -> None:
    keys.mkdir(mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(keys / "admin.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, pem)
    os.close(fd)
    (keys / "trusted_keys").write_text(
        f"admin admin {signing.public_key_line(key, 'admin@systemd-test')}\n")


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployment]:
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    work = Path(tempfile.mkdtemp(prefix="agentd-systemd-"))
    os.chmod(work, 0o755)
    box: Container | None = None
    try:
        src = work / "src"
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".*_cache", "__pycache__", "build", "*.egg-info", "results"))
        _wheelhouse(src, work / "wheels")
        _admin_key(work / "keys")
        box = Container(
            workdir=work,
            # rw: `pip install .` builds in the source tree.
            binds=[(src, "/src")],
            binds_ro=[(work / "wheels", "/wheels"), (work / "keys", "/keys"),
                      # The container's /usr is the host's, so is its package
                      # database: `make install` checks its OS packages there.
                      (Path("/var/lib/dpkg"), "/var/lib/dpkg")],
        )
        try:
            box.start()
        except BootFailed as err:
            # Every precondition of a boot holds here (unavailable() said so):
            # a container that does not boot is a failure, not a skip, or the
            # unit's guarantees would go untested without anyone noticing.
            pytest.fail(f"systemd did not boot in systemd-nspawn: {err}", pytrace=False)
        # /usr is read-only in the container: sysusers.d and tmpfiles.d go to /etc.
        r = box.run(["make", "-C", "/src", "install",
                     "SYSUSERSDIR=/etc/sysusers.d", "TMPFILESDIR=/etc/tmpfiles.d"],
                    env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"}, timeout=300)
        assert "skipped systemctl daemon-reload" not in r.stdout, r.stdout
        box.sh("install -m 0600 /keys/trusted_keys /etc/agentd/trusted_keys && "
               f"install -d -m 0755 {HOSTILE} && "
               f"install -m 0644 /src/tests/hostile/*.py {HOSTILE}/ && "
               "systemctl start agentd.service", timeout=60)
        d = Deployment(box)
        d.ready()
        yield d
    finally:
        problems = box.stop() if box is not None else []
        shutil.rmtree(work, ignore_errors=True)
        assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ tests
@needs_container
def test_ready_with_status(deployed: Deployment) -> None:
    """Type=notify: active only after READY=1; the daemon's STATUS= reaches systemd."""
    d = deployed
    d.ready()
    assert d.box.run(["systemctl", "is-active", "agentd.service"]).stdout.strip() == "active"
    props = d.show("Type", "NotifyAccess", "WatchdogUSec", "StatusText", "Delegate",
                   "KillMode", "Restart", "NoNewPrivileges")
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert props["WatchdogUSec"] == "10s"
    assert props["Delegate"] == "yes"
    assert props["Restart"] == "always"
    assert props["NoNewPrivileges"] == "yes"
    assert props["StatusText"].strip(), "the daemon sent no STATUS="
    info = d.ctl_json("info")
    host_id = d.box.run(["cat", "/var/lib/agentd/host_id"]).stdout.strip()
    assert info["host_id"] == host_id
    # The unit as installed passes systemd's own checks.
    d.box.run(["systemd-analyze", "verify", "/etc/systemd/system/agentd.service"])
    # The agents' subtree is inside the service's cgroup (Delegate=yes).
    assert (d.service_cgroup / "agentd").is_dir()
    assert d.main_pid() in d.own_processes()


@needs_container
def test_daemon_and_agents_under_the_units_sandbox(deployed: Deployment) -> None:
    """The hardening takes nothing the daemon needs, nor an agent's ordinary needs."""
    d = deployed
    d.ready()
    # The daemon sees its agents' /proc despite ProtectProc=invisible: a
    # polite agent is ended by the SIGTERM of a stop, not by the kill after it.
    d.ctl("run", "--name", "polite", "--", "/bin/sleep", "1000")
    stopped = d.ctl_json("stop", "polite", "--grace", "10s")
    assert stopped["terminated_by_sigterm"] >= 1, stopped
    assert Path(f"/proc/{d.main_pid()}/root/proc/stat").exists()
    # Agents get their sandbox under the unit too (bwrap, unprivileged user
    # namespaces): a dynamic uid, no_new_privs, the seccomp filter, loopback
    # only, a private /tmp; and the daemon can check all of it from outside.
    probe = ("import os, socket; socket.socket(socket.AF_INET6).close(); "
             "open('/tmp/agentd-probe', 'w').close(); "
             "print(open('/proc/self/status').read())")
    d.ctl("run", "--name", "probe", "--", "/usr/bin/python3", "-c", probe)
    assert wait_for(lambda: d.ctl_json("status", "probe")["state"] != "AGENT_STATE_RUNNING",
                    timeout=10)
    probed = d.ctl_json("status", "probe")
    status = d.inside(probed["stdout_log"]).read_text()
    assert probed.get("exit_code") == 0, d.inside(probed["stderr_log"]).read_text()
    assert re.search(rf"^Uid:\s+{probed['uid']}\s", status, re.M), status
    assert probed["user"] == f"dynamic:{probed['uid']}"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    assert not d.inside("/tmp/agentd-probe").exists(), "/tmp is not private"
    d.ctl("run", "--name", "sleeper", "--", "/bin/sleep", "1000")
    checks = d.ctl_json("status", "sleeper")["sandbox"]["checks"]
    assert checks and all(c["ok"] for c in checks), checks
    d.ctl("kill", "sleeper")
    # An allowlist agent too: under the unit's capability bounding set the
    # daemon makes, configures and probes its network namespace.
    d.ctl("run", "--name", "fenced", "--allow", "192.0.2.0/24:443", "--reason", "unit test",
          "--", "/bin/sleep", "1000")
    fenced = d.ctl_json("status", "fenced")["sandbox"]
    assert fenced["network"] == "allowlist", fenced
    assert fenced["checks"] and all(c["ok"] for c in fenced["checks"]), fenced["checks"]
    d.ctl("kill", "fenced")


@needs_container
def test_healthy_daemon_outlives_its_watchdog(deployed: Deployment) -> None:
    """The enforcement loop pings WATCHDOG=1: a healthy daemon is never killed for silence."""
    d = deployed
    d.ready()
    before = d.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic")
    time.sleep(WATCHDOG_S * 1.2)
    after = d.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic", "ActiveState")
    assert after["ActiveState"] == "active"
    assert (after["MainPID"], after["NRestarts"]) == (before["MainPID"], before["NRestarts"])
    assert int(after["WatchdogTimestampMonotonic"]) > int(before["WatchdogTimestampMonotonic"])


@needs_container
@pytest.mark.timeout(180)
@pytest.mark.parametrize("hung", [
    # What the brief calls a hung daemon: its guardian (if any) still runs and
    # may kill the agents first, after guardian_timeout_s.
    "daemon",
    # The whole service hangs: only systemd's watchdog is left to act.
    "service",
])
def test_watchdog_kills_a_hung_daemon_and_its_agents(deployed: Deployment, hung: str) -> None:
    d = deployed
    d.ready()
    latched = d.ctl_json("info").get("estop_latched", False)
    restarts = int(d.show("NRestarts")["NRestarts"])
    since = time.time()
    with _pinned(d.run_agent("wd-a", "daemonize.py") + d.run_agent("wd-b", "ignore_term.py")
                 ) as agents, _pinned(_pin(
                     [d.main_pid()] if hung == "daemon" else d.own_processes())) as frozen:
        _signal(frozen, signal.SIGSTOP)
        try:
            assert _all_dead(agents, WATCHDOG_S + ABORT_S + 10), (
                "agents outlived the hung daemon:\n" + d.journal(since))
            assert wait_for(lambda: int(d.show("NRestarts")["NRestarts"]) > restarts,
                            timeout=WATCHDOG_S + ABORT_S + 10, interval=0.2)
        finally:
            _signal(frozen, signal.SIGCONT)
    d.ready()
    journal = d.journal(since)
    assert "Watchdog timeout" in journal, journal
    assert "Failed with result 'watchdog'" in journal, journal
    # Restarted (Restart=always) with no agent and the latch as it was.
    assert d.agent_processes() == []
    info = d.ctl_json("info")
    assert info.get("estop_latched", False) == latched
    running = [a for a in d.ctl_json("ps").get("agents", [])
               if a.get("state") == "AGENT_STATE_RUNNING"]
    assert running == []


@pytest.mark.timeout(180)
@needs_container
def test_estop_latch_survives_a_watchdog_restart(deployed: Deployment) -> None:
    d = deployed
    d.ready()
    restarts = int(d.show("NRestarts")["NRestarts"])
    d.ctl("estop", "--reason", "systemd test")
    try:
        before = d.ctl_json("info")
        assert before["estop_latched"] is True
        with _pinned(_pin([d.main_pid()])) as main:
            _signal(main, signal.SIGSTOP)
            try:
                assert wait_for(lambda: int(d.show("NRestarts")["NRestarts"]) > restarts,
                                timeout=WATCHDOG_S + ABORT_S + 10, interval=0.2)
            finally:
                _signal(main, signal.SIGCONT)
        d.ready()
        after = d.ctl_json("info")
        assert after["estop_latched"] is True
        assert (after["latched_at"], after["latch_reason"]) == (
            before["latched_at"], before["latch_reason"])
        refused = d.ctl("run", "--name", "during-latch", "--", "/bin/true", check=False)
        assert refused.returncode == 6, refused.stderr
        assert d.agent_processes() == []
    finally:
        d.ready()
        d.ctl("reset", "--reason", "systemd test done")
    assert d.ctl_json("info").get("estop_latched", False) is False


@needs_container
@pytest.mark.parametrize("who", [
    # The guardian (if any) sees the daemon die and kills the agents.
    "daemon",
    # Daemon and guardian both gone: KillMode= alone must take the agents.
    "service",
])
def test_kill_9_leaves_no_agent_alive(deployed: Deployment, who: str) -> None:
    d = deployed
    d.ready()
    since = time.time()
    restarts = int(d.show("NRestarts")["NRestarts"])
    with _pinned(d.run_agent("k9-a", "daemonize.py") + d.run_agent("k9-b", "ignore_term.py")
                 ) as agents, _pinned(_pin(
                     [d.main_pid()] if who == "daemon" else d.own_processes())) as doomed:
        _signal(doomed, signal.SIGKILL)
        # Far below the 90 s a SIGTERM-ignoring agent would get from
        # KillMode=control-group's stop-sigterm phase.
        assert _all_dead(agents, 10), "agents outlived the daemon:\n" + d.journal(since)
    assert wait_for(lambda: int(d.show("NRestarts")["NRestarts"]) > restarts, timeout=30)
    d.ready()
    assert d.agent_processes() == []


@needs_container
def test_systemctl_stop_leaves_no_agent_alive(deployed: Deployment) -> None:
    d = deployed
    d.ready()
    since = time.time()
    audit = d.inside("/var/log/agentd/audit.log")
    stops = audit.read_text().count('"daemon_stop"')
    with _pinned(d.run_agent("st-a", "daemonize.py") + d.run_agent("st-b", "ignore_term.py")
                 ) as agents:
        d.box.run(["systemctl", "stop", "agentd.service"], timeout=60)
        # systemctl stop returns once the unit is inactive: nothing may be left by then.
        assert _all_dead(agents, 1), "agents outlived systemctl stop:\n" + d.journal(since)
    props = d.show("ActiveState", "Result")
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success")
    # It shut down on its own terms (SIGTERM), not by systemd's SIGKILL.
    assert audit.read_text().count('"daemon_stop"') == stops + 1
    d.ready()


@needs_container
def test_uninstall_stops_the_service_and_keeps_config_state_and_logs(deployed: Deployment) -> None:
    """Last in the module: it removes the deployment the others use."""
    d = deployed
    d.ready()
    with _pinned(d.run_agent("un-a", "ignore_term.py")) as agents:
        d.box.run(["make", "-C", "/src", "uninstall",
                   "SYSUSERSDIR=/etc/sysusers.d", "TMPFILESDIR=/etc/tmpfiles.d"], timeout=120)
        assert _all_dead(agents, 1), "an agent outlived make uninstall"
    for gone in ("/opt/agentd", "/etc/systemd/system/agentd.service",
                 "/etc/sysusers.d/agentd.conf", "/etc/tmpfiles.d/agentd.conf"):
        assert not d.inside(gone).exists(), gone
    for kept in ("/etc/agentd/agentd.toml", "/etc/agentd/trusted_keys",
                 "/var/lib/agentd/host_id", "/var/log/agentd/audit.log"):
        assert d.inside(kept).exists(), kept
    assert d.show("LoadState")["LoadState"] == "not-found"
