"""Boot a real systemd in a throw-away container and run commands inside it.

`systemd-nspawn --directory=/ --volatile=yes --boot` boots the host's own
systemd on a tmpfs root where only /usr comes from the host (systemd-nspawn(1),
--volatile=): whatever else a test needs is bind-mounted in. With
--register=no there is no machined, so `machinectl shell` and
`systemd-run --machine` cannot reach it; commands enter the container's
namespaces with nsenter(1) instead, by the pid of its init.

Cleanup depends on neither machined nor a host systemd: without them nspawn
leaves its payload/ and supervisor/ cgroups behind when it exits (seen on the
CI machines, where it put them at the root of the host's hierarchies). So
nspawn starts inside a cgroup of our own, in every hierarchy it writes to,
named with the suite's test prefix so the session leak check sees anything
left behind; stopping kills the container and removes that subtree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import CGROUP_PREFIX, cgroup_v2_root

NSPAWN = "/usr/bin/systemd-nspawn"
NSENTER = "/usr/bin/nsenter"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BootFailed(RuntimeError):
    """The container did not reach a running systemd; the message has its console."""


def unavailable() -> str:
    """Why the container tests cannot run on this machine, or "" if they can."""
    if os.geteuid() != 0:
        return "needs root to boot a container with systemd-nspawn"
    for tool in (NSPAWN, NSENTER):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (package systemd-container / util-linux)"
    if not Path("/usr/lib/systemd/systemd").exists():
        return "no systemd under /usr to boot in the container"
    if not os.access("/usr/bin/python3", os.X_OK):
        return "needs /usr/bin/python3: the container sees only the host's /usr"
    try:
        cgroup_v2_root()
    except Exception as err:
        return f"no cgroup v2 hierarchy: {err}"
    return ""


def _named_systemd_mount() -> Path | None:
    """The v1 name=systemd hierarchy of a hybrid host; nspawn creates cgroups there too."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        tail = post.split()
        if len(tail) >= 3 and tail[0] == "cgroup" and "name=systemd" in tail[2].split(","):
            return Path(pre.split()[4])
    return None


def _rmtree_cgroup(path: Path, timeout: float = 10.0) -> bool:
    """rmdir a cgroup subtree, deepest first; retries while the kernel reaps the last tasks."""
    deadline = time.monotonic() + timeout
    while True:
        if not path.exists():
            return True
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, path]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if not path.exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@dataclass
class Container:
    """One booted container. `start()` boots it, `stop()` removes every trace."""

    workdir: Path
    binds: list[tuple[Path, str]] = field(default_factory=list)
    binds_ro: list[tuple[Path, str]] = field(default_factory=list)
    name: str = field(default_factory=lambda: f"{CGROUP_PREFIX}nspawn-{uuid.uuid4().hex[:8]}")
    proc: subprocess.Popen[bytes] | None = None
    leader: int = 0  # the container's init, as a host pid
    cgroups: list[Path] = field(default_factory=list)

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def payload_v2(self) -> Path:
        """The container's root cgroup, as seen from the host."""
        return self.cgroups[0] / "payload"

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def start(self, timeout: float = 60.0) -> None:
        """Boot and wait for systemd to finish starting up. Raises BootFailed."""
        self.cgroups = [cgroup_v2_root() / self.name]
        named = _named_systemd_mount()
        if named is not None:
            self.cgroups.append(named / self.name)
        for cg in self.cgroups:
            cg.mkdir()
        procs = " ".join(str(cg / "cgroup.procs") for cg in self.cgroups)
        argv = [
            NSPAWN, "--directory=/", "--volatile=yes", "--boot", "--register=no",
            "--keep-unit", f"--machine={self.name}", "--console=pipe",
            *(f"--bind={src}:{dst}" for src, dst in self.binds),
            *(f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro),
            # nspawn keeps CAP_NET_ADMIN only with --private-network
            # (systemd-nspawn(1)); a host has it, and the daemon needs it to
            # configure allowlist agents' network namespaces (docs/egress.md).
            "--capability=CAP_NET_ADMIN",
            # Arguments after the options go to the container's init, which
            # reads them as its kernel command line (systemd(1)). basic.target
            # skips the host's enabled services (getty, databases...). The
            # empty /etc looks like a first boot, and systemd-firstboot would
            # wait for answers on the console.
            "systemd.unit=basic.target", "systemd.mask=systemd-firstboot.service",
        ]
        env = {
            "PATH": CONTAINER_PATH,
            # A pure cgroup v2 container even on a hybrid host: in hybrid mode
            # nspawn mounts the v1 controllers read-only, where agentd could
            # not create its agents' cgroups (systemd ENVIRONMENT.md).
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        }
        # Join our cgroups first, then exec nspawn: the container's whole
        # tree (nspawn moves itself to ./supervisor, init to ./payload) lives
        # under them.
        script = 'for f in $CGROUP_PROCS; do echo $$ > "$f" || exit 125; done; exec "$@"'
        log = open(self.console_log, "wb")  # noqa: SIM115 - kept for nspawn's life
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**env, "CGROUP_PROCS": procs},
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootFailed(f"systemd-nspawn exited {self.proc.returncode}:\n"
                                 + self.console())
            if not self.leader:
                self.leader = self._find_leader()
            if self.leader:
                state = self.sh("systemctl is-system-running", check=False,
                                timeout=10).stdout.strip()
                # "degraded": booted, some unit failed; the tests do not need them all.
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise BootFailed(f"systemd in the container did not finish booting within "
                         f"{timeout:.0f}s (state {state!r}):\n" + self.console())

    def _find_leader(self) -> int:
        """The container's pid 1, as a host pid: nspawn's child whose NSpid ends in 1."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return int(child)
        return 0

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60.0,
            env: dict[str, str] | None = None, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces), with a clean environment.

        The process stays in the caller's cgroup, but it is in the container's
        pid namespace, so it dies with the container's init (pid_namespaces(7)).
        """
        assert self.leader, "container not started"
        base = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        cmd = [NSENTER, f"--target={self.leader}", "--all", "--",
               "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in {**base, **(env or {})}.items()),
               *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                check=False, input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container: {' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
            )
        return result

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the container."""
        return self.run(["/bin/sh", "-c", script], **kw)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Shut the container down, kill it if it does not go, remove its cgroups.

        Returns what could not be cleaned up (empty when all went).
        SIGTERM makes nspawn ask the container's systemd for an orderly
        shutdown (SIGRTMIN+3, systemd-nspawn(1) --kill-signal=); SIGKILL to
        the container's init ends its pid namespace, and with it every
        process inside (pid_namespaces(7)).
        """
        problems: list[str] = []
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(timeout=30)
            self.proc = None
        for cg in self.cgroups:
            if not _rmtree_cgroup(cg):
                problems.append(f"cgroup {cg} could not be removed")
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)
        return problems
