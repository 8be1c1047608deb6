"""A real agentd, started as a subprocess, and a signed client for it.

Tests drive the daemon exactly as operators do: over its Unix socket, with
commands signed by keys in its trust store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import grpc
from agentd import auditchain, signing
from agentd.v1 import agentd_pb2, agentd_pb2_grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parent.parent
# Agents see /usr and /etc of the host and nothing else unless a run binds it
# (docs/sandbox.md): hostile programs use Debian's interpreter (a Python
# under /root or a venv under /work is out of their view) and are copied to
# a world-readable directory under HOSTILE_PARENT, which every test daemon
# names as a code root; Daemon.run binds the one a command names, read-only,
# as an operator binds an agent's code.
AGENT_PYTHON = "/usr/bin/python3"
CGROUP_PREFIX = "agentd-test-"
# Benchmarks' daemons and cgroups: apart from the tests', so a benchmark run
# beside the suite never shows up in its leak check (and has its own).
BENCH_PREFIX = "agentd-bench-"
HOSTILE_MARK = "agentd-hostile-"
HOSTILE_PARENT = "/srv/agentd-tests"
# A host directory in every agent's view (/etc): a test daemon kept below it
# is out of its agents' sight only because the sandbox hides it, as a
# deployed daemon's /etc/agentd is.
VIEWED_PARENT = "/etc"
# Every agent runs in a bwrap sandbox: bwrap's outer process (the agent's main
# pid) and its init (pid 1 of the agent's PID namespace) live in the agent's
# cgroup beside the agent's own processes, and count among them.
SANDBOX_PROCS = 2


def code_parent() -> Path:
    """HOSTILE_PARENT, made world-searchable: the test daemons' code root."""
    parent = Path(HOSTILE_PARENT)
    parent.mkdir(mode=0o755, exist_ok=True)
    parent.chmod(0o755)
    return parent


def code_binds(argv: list[str]) -> list[str]:
    """The directories (or files) right below HOSTILE_PARENT that argv names: what to bind."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith(HOSTILE_PARENT + "/"):
            top = HOSTILE_PARENT + "/" + arg[len(HOSTILE_PARENT) + 1:].split("/", 1)[0]
            if top not in out:
                out.append(top)
    return out


def hostile_dir() -> Path:
    """Copy tests/hostile/*.py to a fresh world-readable directory under the code root."""
    d = Path(tempfile.mkdtemp(prefix=HOSTILE_MARK, dir=code_parent()))
    os.chmod(d, 0o755)
    for src in (REPO / "tests" / "hostile").glob("*.py"):
        shutil.copy(src, d / src.name)
        os.chmod(d / src.name, 0o644)
    return d


@dataclass
class Keys:
    admin: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    operator: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    oncall: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    supervisor: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    # A second admin principal, for resets that need two distinct signers.
    admin2: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    stranger: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    ROLES: ClassVar[dict[str, str]] = {"admin": "admin", "operator": "operator", "oncall": "oncall",
             "supervisor": "supervisor", "admin2": "admin"}

    def trust_store(self) -> str:
        return "".join(
            f"{name} {role} {signing.public_key_line(getattr(self, name), name + '@test')}\n"
            for name, role in self.ROLES.items()
        )


class Daemon:
    """One agentd --dev process with its own directory and cgroup subtree."""

    def __init__(self, root: Path, *, mode: str = "auto", extra: list[str] | None = None,
                 keys: Keys | None = None, config: str = "",
                 cgroup_prefix: str = CGROUP_PREFIX, verify_audit: bool = True) -> None:
        self.dir = root
        # Every stop checks the audit chain the daemon left (check_audit_chain);
        # only a test that breaks the log on purpose passes verify_audit=False.
        self.verify_audit = verify_audit
        self.mode = mode
        self.extra = extra or []
        self.keys = keys or Keys()
        self.cgroup_name = cgroup_prefix + uuid.uuid4().hex[:10]
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: agentd_pb2_grpc.AgentdStub
        self.host_id = ""
        self.stderr_path = root.parent / (root.name + ".stderr")
        self.config = config

    @property
    def socket(self) -> Path:
        return self.dir / "agentd.sock"

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.log"

    def start(self, timeout: float = 60.0) -> Daemon:
        self.dir.mkdir(mode=0o750, exist_ok=True)
        config = self.config
        if "code_roots" not in config:
            # Agents' code lives there (hostile_dir): binding it is no escalation.
            config = (config.rstrip("\n") + "\n" if config else "") + (
                f'code_roots = ["{code_parent()}"]\n')
        (self.dir / "agentd.toml").write_text(config)
        ts = self.dir / "trusted_keys"
        if not ts.exists():
            ts.write_text(self.keys.trust_store())
            os.chmod(ts, 0o600)
        cmd = [sys.executable, "-m", "daemon.main", "--dev", str(self.dir),
               "--cgroup-name", self.cgroup_name, "--cgroup-mode", self.mode, *self.extra]
        err = open(self.stderr_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(cmd, stdout=err, stderr=err, cwd=REPO)
        err.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited {self.proc.returncode}:\n{self.stderr()}")
            if self.socket.is_socket():
                try:
                    self.connect()
                    self.host_id = self.stub.Info(agentd_pb2.InfoRequest(), timeout=2).host_id
                    return self
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"agentd did not come up:\n{self.stderr()}")
            time.sleep(0.05)

    def connect(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.stub = agentd_pb2_grpc.AgentdStub(self.channel)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Stop the daemon (it kills its agents on SIGTERM). Returns its exit code."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        if self.verify_audit:
            self.check_audit_chain(clean=rc == 0)
        return rc

    def check_audit_chain(self, *, clean: bool = True) -> None:
        """Fail (AssertionError) unless the audit log verifies against its head file.

        Uses the project's own verifier (agentd.auditchain), as `agentctl audit
        verify` does. After a clean exit the head names the last record; after
        a crash it may lag by one record, never more.
        """
        if not self.audit_log.exists():
            return  # the daemon never got as far as opening it
        head_file = auditchain.head_path(self.audit_log)
        assert head_file.exists(), f"{self.audit_log}: the daemon left no head file {head_file}"
        head = auditchain.read_head(head_file)
        report = auditchain.verify(self.audit_log, expected_head=head)
        assert report.ok, f"{self.audit_log} does not verify:\n" + "\n".join(report.problems)
        allowed = 0 if clean else 1
        assert report.beyond_head <= allowed, (
            f"{self.audit_log}: {report.beyond_head} record(s) beyond the head {head} "
            f"after a{' clean' if clean else 'n unclean'} stop")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ------------------------------------------------------------ commands
    def command(self, *, reason: str = "test", lifetime: float = 300.0,
                now: float | None = None, audience: str | None = None) -> agentd_pb2.Command:
        return signing.new_command(audience=self.host_id if audience is None else audience,
                                   reason=reason, now=time.time() if now is None else now,
                                   lifetime_s=lifetime)

    def sign(self, cmd: agentd_pb2.Command,
             key: Ed25519PrivateKey | None = None) -> agentd_pb2.Envelope:
        return signing.sign_command(cmd, key or self.keys.admin)

    def run(self, name: str, argv: list[str], *, pids: int = 0, memory: int = 0,
            cpu_millis: int = 0, user: str = "", key: Ed25519PrivateKey | None = None,
            lease_ms: int | None = None, max_runtime_ms: int | None = None,
            policy: str = "", overrides: agentd_pb2.PolicyOverrides | None = None,
            reason: str = "test") -> agentd_pb2.Agent:
        """Run argv as agent name, signed by key (default: the operator's).

        policy and overrides choose its sandbox; anything looser than the
        default profile needs key=self.keys.admin and a reason. What argv
        names under the code root (HOSTILE_PARENT) is bound read-only.
        """
        cmd = self.command(reason=reason)
        cmd.run.policy = policy
        if overrides is not None:
            cmd.run.overrides.CopyFrom(overrides)
        cmd.run.overrides.bind_ro.extend(
            b for b in code_binds(argv) if b not in cmd.run.overrides.bind_ro)
        if lease_ms is not None:
            cmd.run.lease_ms = lease_ms
        if max_runtime_ms is not None:
            cmd.run.max_runtime_ms = max_runtime_ms
        cmd.run.name = name
        cmd.run.argv.extend(argv)
        cmd.run.user = user
        cmd.run.resources.pids_max = pids
        cmd.run.resources.memory_bytes = memory
        cmd.run.resources.cpu_millis = cpu_millis
        result: agentd_pb2.Agent = self.stub.Run(self.sign(cmd, key or self.keys.operator),
                                                 timeout=30)
        return result

    def kill(self, name: str, key: Ed25519PrivateKey | None = None) -> agentd_pb2.KillResult:
        cmd = self.command()
        cmd.kill.name = name
        result: agentd_pb2.KillResult = self.stub.Kill(self.sign(cmd, key or self.keys.oncall),
                                                       timeout=60)
        return result

    def stop_agent(self, name: str, grace_ms: int | None = None,
                   key: Ed25519PrivateKey | None = None) -> agentd_pb2.KillResult:
        cmd = self.command()
        cmd.stop.name = name
        if grace_ms is not None:
            cmd.stop.grace_ms = grace_ms
        result: agentd_pb2.KillResult = self.stub.Stop(self.sign(cmd, key or self.keys.oncall),
                                                       timeout=60)
        return result

    def signed(self, fill: object, key: Ed25519PrivateKey | None = None,
               **kw: object) -> agentd_pb2.Envelope:
        """A fresh command, filled in by fill(cmd), signed with key (default: admin)."""
        cmd = self.command(**kw)  # type: ignore[arg-type]
        fill(cmd)  # type: ignore[operator]
        return self.sign(cmd, key or self.keys.admin)

    def get(self, name: str) -> agentd_pb2.Agent:
        result: agentd_pb2.Agent = self.stub.GetAgent(agentd_pb2.GetAgentRequest(name=name),
                                                      timeout=10)
        return result

    def audit_records(self) -> list[dict[str, object]]:
        import json

        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


# ------------------------------------------------------------------ kernel facts
def cgroup_v2_root() -> Path:
    from daemon.cgroups.layout import discover

    return discover().unified


def v2_cgroup_of(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def host_pid(cgroup: str | Path, ns_pid: int) -> int | None:
    """The host pid of the member of cgroup whose pid in its own PID namespace is ns_pid.

    Sandboxed agents see their own PID namespace (pid_namespaces(7)); the last
    field of NSpid in /proc/PID/status is the pid as they see it.
    """
    try:
        members = pids_in(cgroup)
    except OSError:  # ENODEV: the cgroup is being removed
        return None
    for pid in members:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[-1] == str(ns_pid):
                return pid
    return None


def pids_in(path: str | Path) -> list[int]:
    try:
        return [int(x) for x in (Path(path) / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_for(cond: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(cond())  # type: ignore[operator]


def leaked_processes(prefix: str = CGROUP_PREFIX, mark: str | None = HOSTILE_MARK) -> list[str]:
    """Processes in a cgroup subtree named prefix* or (mark set) running a hostile program."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cg = v2_cgroup_of(pid) or ""
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if not alive(pid):
            continue
        if (f"/{prefix}" in cg and not cg.endswith("/supervisor")) or (
            mark is not None and mark in cmdline and "pytest" not in cmdline
        ):
            out.append(f"pid {pid} cgroup {cg} cmd {cmdline[:120]}")
    return out


def leaked_cgroups(prefix: str = CGROUP_PREFIX) -> list[str]:
    """Cgroup directories named prefix* (the tests' by default) left in any hierarchy."""
    out = []
    for mount in Path("/sys/fs/cgroup").iterdir():
        if not mount.is_dir():
            continue
        try:
            found = subprocess.run(
                ["find", str(mount), "-maxdepth", "6", "-type", "d", "-name", prefix + "*"],
                capture_output=True, text=True, timeout=30,
            ).stdout.split()
        except subprocess.TimeoutExpired:
            continue
        out.extend(found)
    return out
