"""Escape suite: each technique is a small agent program, and each must be contained.

Every program runs as an agent of a real daemon under its default profile
(sandboxed: no network, read-only host view, private scratch, hidden daemon
state, own PID namespace, no capabilities, no_new_privs, seccomp). Each test
asserts that every attempt was contained, judged from the host wherever the
host can see the outcome; that the daemon still answers; that the bystander
agent started before runs on untouched; that nothing appeared on the host;
and that the kill leaves no process behind. Techniques contained only by the
sandbox carry `needs_sandbox` and are skipped, saying so, when the daemon
reports no sandbox for its agents.

The session ends with a table of techniques tried and contained.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from tests.escape import runner
from tests.escape.conftest import CANARY, TAG, Escape, sandbox_missing
from tests.escape.listeners import HostListeners
from tests.escape.runner import Attempt, Judge, blocked
from tests.harness import Daemon, cgroup_v2_root, pids_in, v2_cgroup_of

pytestmark = pytest.mark.root
MIB = 1 << 20


@pytest.fixture
def listeners() -> Iterator[HostListeners]:
    ls = HostListeners()
    yield ls
    ls.close()


def _controller_or_skip(escape: Escape, controller: str, why: str) -> None:
    from daemon.cgroups.layout import discover

    if discover(escape.daemon.mode).holder(controller) is None:
        pytest.skip(f"no {controller} controller on this host's {escape.daemon.mode} "
                    f"hierarchy: {why}")


def _absent_on_host(path: str) -> Judge:
    """Contained if the host has no such file, whatever the agent believed."""
    return lambda _attempt: not os.path.lexists(path)


# ------------------------------------------------------------------ network
@pytest.mark.needs_sandbox
def test_loopback_connect(escape: Escape, listeners: HostListeners) -> None:
    """network = none: the host's loopback listeners and abstract sockets hear nothing.

    The agent connects over TCP to 127.0.0.1 and ::1, sends UDP to
    127.0.0.1, connects to the host's abstract Unix socket, and opens
    AF_VSOCK and raw sockets. In its own network namespace the host's
    loopback is not its loopback; a UDP send "works" there, so for UDP only
    the host's receiver decides. AF_VSOCK is not confined by network
    namespaces (on a VM it reaches the hypervisor's services): the family
    itself must be refused. Nothing is ever sent over it here.
    """
    agent = escape.run("net_loopback.py", {**listeners.ports, "token": escape.tag})
    report = escape.report(agent)
    time.sleep(0.3)  # let the listener thread take anything still in flight
    heard = listeners.heard
    host: dict[str, Judge] = {
        "tcp-127.0.0.1": lambda a: blocked(a) and not heard["tcp"],
        "tcp-::1": lambda a: blocked(a) and not heard["tcp6"],
        "tcp-localhost-name": lambda a: blocked(a) and not (heard["tcp"] or heard["tcp6"]),
        "udp-127.0.0.1": lambda _a: not heard["udp"],
        f"abstract-unix:@{listeners.abstract_name}":
            lambda a: blocked(a) and not heard["abstract"],
    }
    escape.conclude(report, runner.verdicts(report, host),
                    [f"the host's listeners heard {dict(heard)}"] if heard else [])


# ------------------------------------------------------------------ filesystem
@pytest.mark.needs_sandbox
def test_write_outside_scratch(escape: Escape) -> None:
    """The host view is read-only: nothing written outside /scratch reaches the host.

    Creating files in /etc, /usr, /var/tmp, /tmp, /dev/shm, /run, /root, /,
    the programs' own directory and the daemon's, directly and through
    /proc/1/root, and opening existing host files for writing. A file the
    agent created in its private /tmp is contained: the host check decides.
    """
    tag, d = escape.tag, escape.daemon
    paths = [f"/{tag}", f"/etc/{tag}", f"/usr/{tag}", f"/usr/local/{tag}", f"/var/tmp/{tag}",
             f"/tmp/{tag}", f"/dev/shm/{tag}", f"/root/{tag}", f"/run/{tag}",
             str(escape.programs / tag), str(d.dir / tag), str(d.dir.parent / tag)]
    listing = sorted(p.name for p in escape.programs.iterdir())
    agent = escape.run("write_outside.py", {
        "paths": paths, "own_program": str(escape.programs / "write_outside.py")})
    report = escape.report(agent)
    host: dict[str, Judge] = {}
    for p in paths:
        host[f"create:{p}"] = _absent_on_host(p)
        host[f"create-via-proc1-root:{p}"] = _absent_on_host(f"{p}-p1")
    host["mkdir:/etc"] = _absent_on_host(f"/etc/{tag}-dir")
    extra = []
    if sorted(p.name for p in escape.programs.iterdir()) != listing:
        extra.append("the programs' directory changed")
    escape.conclude(report, runner.verdicts(report, host), extra)


@pytest.mark.needs_sandbox
def test_leave_a_file_for_a_later_run(escape: Escape) -> None:
    """Each run's scratch is private and vanishes: a later run finds no note.

    Run A leaves notes in /scratch, $HOME, /tmp, /var/tmp and /dev/shm and is
    killed; run B under the same name and run C under another look for them,
    and for the files the running bystander left in its own scratch and /tmp.
    """
    bystander_tag = escape.bystander.tag
    a = escape.run("leave_note.py", {"mode": "write", "bystander_tag": bystander_tag})
    left = escape.report(a)
    problems = runner.end_agent(escape.daemon, escape.daemon.get(a.name))
    # Positive control: the notes were really written somewhere the agent could.
    assert "left:scratch" in left.facts, f"run A could not write its scratch: {left.facts}"
    merged = runner.Report()
    for label, name in (("same-name", a.name), ("other-name", f"{a.name}-other")):
        b = escape.run("leave_note.py", {"mode": "read", "bystander_tag": bystander_tag},
                       name=name)
        found = escape.report(b)
        merged.attempts.update({f"{label}:{k}": Attempt(f"{label}:{k}", v.outcome, v.detail)
                                for k, v in found.attempts.items()})
    escape.conclude(merged, runner.verdicts(merged), problems)


# ------------------------------------------------------------------ the daemon's secrets
def test_read_the_daemons_secrets(escape: Escape) -> None:
    """The daemon's files are hidden: no path to them opens, however spelled.

    Every file under the daemon's directory (trust store, audit log and its
    head, replay cache, host id, other agents' logs, a policy, a private key
    left there, mode 0600), by path, through /proc/1/root and the daemon's
    /proc/PID/root, after chdir, and with openat from a directory
    descriptor; the daemon's cwd, descriptors, environment, maps and memory.
    Under the sandbox each must be absent (ENOENT), not merely unreadable:
    the permissions are the second layer, not the only one.
    """
    secrets = escape.secrets.paths()
    assert str(escape.secrets.private_key) in secrets.values()
    assert any(label.endswith("trusted_keys") for label in secrets)
    assert any(label.endswith("audit.log") for label in secrets)
    assert any(label.startswith("policies/") for label in secrets)
    agent = escape.run("read_secrets.py", {
        "secrets": secrets, "daemon_pid": escape.daemon.pid,
        "state_dir": str(escape.daemon.dir / "state")})
    report = escape.report(agent)
    hidden: dict[str, Judge] = {}
    if not sandbox_missing(escape.daemon.get(agent.name)):
        hidden = {name: lambda a: blocked(a) and a.detail == "ENOENT" for name in report.attempts}
    escape.conclude(report, runner.verdicts(report, hidden))


@pytest.fixture
def host_service() -> Iterator[HostListeners]:
    """A world-connectable Unix socket in /srv (visible, read-only), standing in for any
    host service's: a read-only mount does not stop connect(2) to a socket file."""
    ls = HostListeners(socket_path=f"/srv/{TAG}-host-service.sock")
    yield ls
    ls.close()


def test_connect_to_the_control_socket(escape: Escape, host_service: HostListeners) -> None:
    """The control socket is out of reach (hidden): by path, via /proc roots, or by a scan.

    Peers' agents switched their sandbox off through an unauthenticated
    control channel. The agent also walks the filesystem it can see for
    socket files and tries each; the host keeps one, mode 0666, in /srv
    (the host's shared temporary directory) for it to find: a Unix socket
    reached through the filesystem is a channel out of network = none.
    """
    d = escape.daemon
    assert d.socket.is_socket()
    agent = escape.run("control_socket.py", {
        "socket": str(d.socket), "daemon_pid": d.pid,
        "scan_roots": ["/run", "/var/run", "/tmp", "/var/tmp", "/srv", "/dev", "/root", "/home",
                       "/var/lib", "/etc", str(d.dir.parent)]})
    report = escape.report(agent)
    time.sleep(0.3)  # let the listener thread take anything still in flight
    heard = host_service.heard
    stand_in = f"socket-file:{host_service.socket_path}"
    host: dict[str, Judge] = {stand_in: lambda a: blocked(a) and not heard["path"]}
    if not sandbox_missing(escape.daemon.get(agent.name)):  # hidden, not merely refused
        host.update({name: lambda a: blocked(a) and a.detail == "ENOENT"
                     for name in report.attempts if name.startswith("daemon-socket-seen:")})
    extra = [f"the stand-in host service heard {heard['path']} connection(s)"] if (
        heard["path"]) else []
    escape.conclude(report, runner.verdicts(report, host), extra)


# ------------------------------------------------------------------ processes
def test_signal_or_trace_the_daemon(escape: Escape) -> None:
    """The daemon and its guardian cannot be signalled, traced or read.

    kill with 0, SIGSTOP and SIGKILL, pidfd_open and pidfd_send_signal,
    PTRACE_ATTACH and PTRACE_SEIZE, process_vm_readv, /proc/PID/mem and
    environ, aimed at the daemon's and the guardian's host pids. The host
    then checks both are alive and the daemon answers.
    """
    victims = {"daemon": escape.daemon.pid}
    if escape.secrets.guardian_pid:
        victims["guardian"] = escape.secrets.guardian_pid
    agent = escape.run("signal_ptrace.py", {"victims": victims})
    report = escape.report(agent)
    escape.conclude(report, runner.verdicts(report))


@pytest.mark.needs_sandbox
def test_signal_or_trace_another_agent(escape: Escape) -> None:
    """Another agent, even under the same uid, is out of reach: its own PID namespace.

    The same attempts against every process of the bystander; then
    kill(-1, 0) (may the agent signal anyone at all?), kill(pid, 0) on every
    pid its /proc lists, and ptrace of its own child, which seccomp refuses.
    The bystander must run on, unstopped.
    """
    victims = {f"bystander-{i}": pid for i, pid in enumerate(escape.bystander.pids)}
    agent = escape.run("signal_ptrace.py", {"victims": victims, "broad": True})
    report = escape.report(agent)
    escape.conclude(report, runner.verdicts(report))


# ------------------------------------------------------------------ privilege
@pytest.mark.needs_sandbox
def test_setuid_binary(escape: Escape) -> None:
    """A setuid-root binary gives no privilege: no_new_privs and a nosuid host view.

    A setuid-root copy of id(1) beside the programs, passwd -S (reads
    /etc/shadow), su, sudo and mount; setuid(0). `id -u` must stay the
    agent's uid.
    """
    suid = escape.programs / "suid-id"
    assert suid.stat().st_mode & 0o4000 and suid.stat().st_uid == 0
    agent = escape.run("setuid_gain.py", {"suid_id": str(suid)})
    report = escape.report(agent)
    extra = [] if report.facts.get("uid", "0") != "0" else ["the agent runs as root"]
    escape.conclude(report, runner.verdicts(report), extra)


@pytest.mark.needs_sandbox
def test_mount_and_unshare(escape: Escape) -> None:
    """No mounts and no new namespaces: no capabilities, and seccomp refuses the rest.

    mount(2) of a tmpfs; unshare(2) and clone(2) with CLONE_NEWUSER alone and
    with mount, network, PID and cgroup namespaces; clone3(2) with
    CLONE_NEWUSER; setns(2) into pid 1's and the daemon's namespaces;
    pivot_root, chroot, open_tree and fsopen. Each in a child of its own.
    """
    agent = escape.run("namespaces.py", {"daemon_pid": escape.daemon.pid})
    report = escape.report(agent)
    mounts = Path("/proc/self/mountinfo").read_text()
    extra = [f"a mount with the tag appeared on the host: {escape.tag}"] if (
        escape.tag in mounts) else []
    escape.conclude(report, runner.verdicts(report), extra)


# ------------------------------------------------------------------ cgroups
def _v1_mount(path: str) -> Path:
    """The v1 hierarchy's mount point a cgroup directory lies under (/sys/fs/cgroup/NAME)."""
    return next(p for p in Path(path).parents if p.parent == Path("/sys/fs/cgroup"))


def test_move_to_another_cgroup(escape: Escape) -> None:
    """The agent stays in its cgroups and cannot touch its limits or another agent's.

    Write itself into cgroup.procs of the v2 root, its parent, the daemon's
    cgroup, the bystander's, and each v1 hierarchy's root and parent; make a
    sub-cgroup; raise its own pids, memory and cpu limits and the
    bystander's; kill and freeze the bystander through cgroupfs. The host
    then reads every process's cgroups and the limits back.
    """
    d, b = escape.daemon, escape.bystander
    own_v2 = Path(b.agent.cgroup_paths[0]).parent / "{self}"
    parent_v2 = own_v2.parent
    daemon_cg = v2_cgroup_of(d.pid) or "/"
    writes: list[tuple[str, str, str]] = [
        ("move-to:v2-root", str(cgroup_v2_root() / "cgroup.procs"), "0"),
        ("move-to:v2-parent", str(parent_v2 / "cgroup.procs"), "0"),
        ("move-to:daemon-cgroup", f"{cgroup_v2_root()}{daemon_cg}/cgroup.procs", "0"),
        ("move-to:bystander", str(Path(b.agent.cgroup_paths[0]) / "cgroup.procs"), "0"),
    ]
    mkdirs = [("mkdir-sub-cgroup:v2", str(own_v2 / "escape"))]
    for other in b.agent.cgroup_paths[1:]:
        hierarchy, mount = Path(other).parent, _v1_mount(other)
        name = mount.name
        writes += [(f"move-to:{name}-root", str(mount / "cgroup.procs"), "0"),
                   (f"move-to:{name}-parent", str(hierarchy / "cgroup.procs"), "0")]
        mkdirs.append((f"mkdir-sub-cgroup:{name}", str(hierarchy / "{self}" / "escape")))
    knobs = {"pids.max": "max", "memory.max": "max", "memory.limit_in_bytes": "-1",
             "cpu.max": "max", "cpu.cfs_quota_us": "-1", "cgroup.subtree_control": "+pids"}
    for path in b.agent.cgroup_paths:
        for knob, value in knobs.items():
            if (Path(path) / knob).exists():
                name = "v2" if path == b.agent.cgroup_paths[0] else _v1_mount(path).name
                writes.append((f"raise-own:{name}:{knob}",
                               str(Path(path).parent / "{self}" / knob), value))
                writes.append((f"raise-bystander:{name}:{knob}", str(Path(path) / knob), value))
    for path in b.agent.cgroup_paths:
        for knob, value in (("cgroup.kill", "1"), ("cgroup.freeze", "1"),
                            ("freezer.state", "FROZEN")):
            if (Path(path) / knob).exists():
                writes.append((f"bystander:{knob}", str(Path(path) / knob), value))
    agent = escape.run("cgroup_escape.py", {"writes": writes, "mkdirs": mkdirs},
                       pids=100, memory=256 * MIB)
    report = escape.report(agent)
    agent = escape.daemon.get(agent.name)
    extra = []
    own = "/" + str(Path(agent.cgroup_paths[0]).relative_to(cgroup_v2_root()))
    for pid in pids_in(agent.cgroup_paths[0]):
        if v2_cgroup_of(pid) != own:
            extra.append(f"process {pid} is in {v2_cgroup_of(pid)}, not {own}")
    for path in agent.cgroup_paths[1:]:
        if sorted(pids_in(path)) != sorted(pids_in(agent.cgroup_paths[0])):
            extra.append(f"{path} holds {pids_in(path)}, the v2 cgroup "
                         f"{pids_in(agent.cgroup_paths[0])}")
    for path in agent.cgroup_paths:
        if (Path(path) / "escape").exists():
            extra.append(f"a sub-cgroup appeared: {path}/escape")
        for knob, expected in (("pids.max", "100"), ("memory.max", str(256 * MIB)),
                               ("memory.limit_in_bytes", str(256 * MIB))):
            if (Path(path) / knob).exists():
                value = (Path(path) / knob).read_text().strip()
                if value != expected:
                    extra.append(f"{path}/{knob} is {value}, not {expected}")
    escape.conclude(report, runner.verdicts(report), extra)


def test_fork_bomb(escape: Escape) -> None:
    """A fork bomb stops at the agent's pids limit; the daemon and the bystander carry on.

    Every process forks as fast as it can, under pids = 64. While it pushes,
    the host counts the agent's processes, times an Info call and checks the
    bystander; then the kill must take every process down.
    """
    _controller_or_skip(escape, "pids", "a fork bomb without a pids limit would take the "
                        "machine down")
    agent = escape.run("fork_bomb.py", {}, pids=64)
    report = escape.report(agent, timeout=30)
    time.sleep(1.0)  # let it push against the limit for a while
    count = len(pids_in(agent.cgroup_paths[0]))
    started = time.monotonic()
    escape.daemon.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
    info_s = time.monotonic() - started
    extra = [] if info_s < 2.0 else [f"Info took {info_s:.1f}s during the fork bomb"]
    host: dict[str, Judge] = {"fork-past-pids-limit": lambda a: blocked(a) and count <= 64}
    if count > 64:
        extra.append(f"the agent holds {count} processes, over its pids limit of 64")
    escape.conclude(report, runner.verdicts(report, host), extra)


def test_memory_bomb(escape: Escape) -> None:
    """A memory bomb is OOM-killed alone; the daemon survives and reports the OOM kill.

    The agent allocates and touches memory under memory = 64M. The kernel's
    OOM killer must end it (and only it): the daemon reports the end, with
    oom_kills >= 1 in GetAgent and in the audit record, and keeps answering.
    """
    _controller_or_skip(escape, "memory", "without a memory limit the bomb would eat the host")
    agent = escape.run("memory_bomb.py", {}, memory=64 * MIB)
    ended = runner.wait_ended(escape.daemon, agent.name, timeout=60)
    report = runner.parse(runner.output(agent))
    peak = int(report.facts.get("allocated-mib", "0"))
    records = [r for r in escape.daemon.audit_records()
               if r["event"] == "agent_ended" and r.get("agent_id") == agent.id]
    extra = []
    if ended.oom_kills < 1:
        extra.append(f"GetAgent reports oom_kills {ended.oom_kills} "
                     f"(end {ended.end_reason}, signal {ended.exit_signal}, "
                     f"code {ended.exit_code})")
    if not records or int(records[0].get("oom_kills") or 0) < 1:  # type: ignore[call-overload]
        extra.append(f"the audit record of the end has no OOM kill: {records}")
    if peak > 64 + 8:
        extra.append(f"the agent touched {peak} MiB under a 64 MiB limit")
    contained = {"exceed-memory-limit": "exceed-memory-limit" not in report.attempts
                 and ended.oom_kills >= 1}
    escape.conclude(report, contained, extra)


# ------------------------------------------------------------------ disk
def _free_bytes() -> dict[str, int]:
    """Free bytes of every real host filesystem, by mount point."""
    out = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if fstype in ("ext4", "ext3", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "f2fs"):
            try:
                st = os.statvfs(mount.replace("\\040", " "))
            except OSError:
                continue
            out[mount] = st.f_bavail * st.f_frsize
    return out


@pytest.mark.needs_sandbox
def test_fill_scratch(escape: Escape) -> None:
    """Writing stops at the scratch cap (ENOSPC); nothing else writable is uncapped.

    The agent writes to /scratch until refused, keeping what it wrote, then
    to /tmp, /dev/shm, /dev and / (each up to 8 times the cap). Every write
    must stop at a cap, or be refused: an uncapped tmpfs is host memory. The
    host's filesystems lose no more than the cap.
    """
    cap = 32 * MIB
    before = _free_bytes()
    agent = escape.run("fill_disk.py", {"budget_bytes": 8 * cap}, scratch_bytes=cap)
    applied = escape.daemon.get(agent.name).sandbox.scratch_bytes or cap
    report = escape.report(agent, timeout=90)
    after = _free_bytes()
    extra = [f"{m} lost {(before[m] - after[m]) // MIB} MiB" for m in after
             if m in before and before[m] - after[m] > applied + 64 * MIB]
    written = int(report.facts.get("scratch-written-bytes", "0"))
    host: dict[str, Judge] = {"fill-scratch": lambda a: blocked(a) and written <= applied + MIB}
    if written == 0:
        extra.append("the agent could not write its scratch at all")
    escape.conclude(report, runner.verdicts(report, host), extra)


# ------------------------------------------------------------------ kernel
def test_write_sysrq_and_sysctls(escape: Escape) -> None:
    """/proc/sysrq-trigger, /proc/sys, the hostname and the OOM score stay out of reach.

    sysrq "h" (help only), each sysctl rewritten with its own value,
    sethostname to the same name, oom_score_adj -1000, /sys knobs. The host
    then reads its hostname and core_pattern back.
    """
    hostname = Path("/proc/sys/kernel/hostname").read_text()
    core = Path("/proc/sys/kernel/core_pattern").read_text()
    agent = escape.run("kernel_knobs.py", {})
    report = escape.report(agent)
    extra = [f"{p} changed" for p, v in (("/proc/sys/kernel/hostname", hostname),
                                          ("/proc/sys/kernel/core_pattern", core))
             if Path(p).read_text() != v]
    escape.conclude(report, runner.verdicts(report), extra)


_HARMLESS_DEVICES = {"null", "zero", "full", "random", "urandom", "tty", "ptmx"}
# Opening these has effects of its own (a watchdog arms on open; a PM QoS
# request is made): never tried, even by root.
_NEVER_OPEN = re.compile(r"^(watchdog\d*|cpu_dma_latency|snapshot|rfkill)$")
_ONE_OF_MANY = re.compile(r"^(tty|vcs|vcsa|vcsu|loop|ttyS)(\d+)$")


def _host_devices() -> list[str]:
    """Host character and block devices an agent must not open: all but the harmless."""
    out, seen_family = [], set()
    for top, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if d not in ("shm", "mqueue", "hugepages")]
        for name in sorted(files):
            path = os.path.join(top, name)
            if os.path.islink(path) or name in _HARMLESS_DEVICES or _NEVER_OPEN.match(name):
                continue
            if not (Path(path).is_char_device() or Path(path).is_block_device()):
                continue
            family = _ONE_OF_MANY.match(name)
            if family and int(family.group(2)) > 1:
                if family.group(1) in seen_family:
                    continue
                seen_family.add(family.group(1))
            out.append(path)
    return [*out, "/proc/kcore"]


def _root_disk() -> tuple[int, int]:
    for dev in sorted(Path("/sys/block").glob("*/dev")):
        if not dev.parent.name.startswith(("loop", "zram", "ram")):
            major, minor = dev.read_text().split(":")
            return int(major), int(minor)
    return 8, 0


@pytest.mark.needs_sandbox
def test_kernel_attack_surface(escape: Escape) -> None:
    """Host devices, TIOCSTI, mknod, and the syscalls the seccomp filter refuses.

    Opening /proc/kcore, /dev/mem, disks, /dev/kvm, /dev/kmsg and every other
    host device but the harmless few; TIOCSTI; mknod of /dev/mem and of the
    host's disk; open_by_handle_at ("shocker"); add_key and keyctl; bpf;
    perf_event_open; io_uring_setup; userfaultfd; kexec_load,
    init_module, finit_module, delete_module, reboot and swapon with
    invalid arguments; iopl; raising RLIMIT_NOFILE.
    """
    agent = escape.run("kernel_surface.py", {"devices": _host_devices(),
                                             "root_disk": _root_disk()})
    report = escape.report(agent)
    escape.conclude(report, runner.verdicts(report))


@pytest.mark.needs_sandbox
def test_sandbox_seen_from_inside(escape: Escape) -> None:
    """What the agent finds in /proc/self matches what the daemon reports from outside.

    Peers' sandboxes reported success while restrictions silently did not
    apply. From inside: not root; no capabilities (effective, permitted,
    inheritable, ambient, bounding); no_new_privs; seccomp filter mode; PID,
    network and mount namespaces not the host's; loopback only; no canary
    from the daemon's environment. From outside: every check in
    Agent.sandbox is ok, and the network is "none".
    """
    host_ns = {ns: os.readlink(f"/proc/{escape.daemon.pid}/ns/{ns}")
               for ns in ("pid", "net", "mnt", "ipc", "uts", "user", "cgroup")}
    agent = escape.run("introspect.py", {"host_ns": host_ns, "private_ns": ["pid", "net", "mnt"],
                                         "canary": CANARY})
    report = escape.report(agent)
    sandbox = escape.daemon.get(agent.name).sandbox
    extra = [f"the daemon reports {c.name} not ok: {c.detail}" for c in sandbox.checks if not c.ok]
    if sandbox.network != "none":
        extra.append(f"the default profile's network is {sandbox.network!r}")
    escape.conclude(report, runner.verdicts(report), extra)


@pytest.mark.needs_sandbox
@pytest.mark.parametrize("omit", ["network", "seccomp", "pid"])
def test_restriction_left_out_is_caught(escape: Escape, omit: str) -> None:
    """A sandbox missing one restriction never runs an agent: the daemon's outside check sees it.

    Peers' sandboxes reported success while restrictions silently did not
    apply. A dev daemon told to leave one restriction out (sandbox_test_omit,
    for tests only) must refuse the launch: its checks from outside find the
    hole. Should it launch anyway, the introspection program shows what the
    agent really got, next to what the daemon claimed.
    """
    root = Path(tempfile.mkdtemp(prefix="agentd-t-omit-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    d = Daemon(root / "dev", mode="auto", config=f'sandbox_test_omit = "{omit}"\n').start()
    try:
        host_ns = {ns: os.readlink(f"/proc/{d.pid}/ns/{ns}") for ns in ("pid", "net", "mnt")}
        try:
            agent = runner.launch(d, escape.programs, f"omit-{omit}", "introspect.py", {
                "tag": escape.tag, "host_ns": host_ns, "private_ns": ["pid", "net", "mnt"],
                "canary": CANARY})
        except grpc.RpcError as err:
            refused = err.code() == grpc.StatusCode.FAILED_PRECONDITION
            escape.conclude(None, {f"launch-without-{omit}": refused},
                            [] if refused else [f"launch failed otherwise: {err.details()}"])
            return
        report = runner.wait_report(d, agent)
        claimed = "; ".join(f"{c.name}={'ok' if c.ok else 'NOT ok'}"
                            for c in d.get(agent.name).sandbox.checks)
        problems = runner.end_agent(d, d.get(agent.name))
        escape.conclude(None, {f"launch-without-{omit}": False}, [
            f"the daemon ran an agent without {omit}; it claimed: {claimed}",
            "inside: " + ", ".join(f"{a.name} {a.outcome}" for a in report.attempts.values()
                                   if a.outcome != "BLOCKED"), *problems])
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
