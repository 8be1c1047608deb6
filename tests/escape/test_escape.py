"""Escape suite: each technique is a small agent program, and each must be contained.

Every program runs as an agent of a real daemon under its default profile
(sandboxed: no network, the system files only, read-only, its code bound by
name, private scratch, hidden daemon state, own PID namespace, no
capabilities, no_new_privs, seccomp). Each test asserts that every attempt
was contained, judged from the host wherever the
host can see the outcome; that the daemon still answers; that the bystander
agent started before runs on untouched; that nothing appeared on the host;
and that the kill leaves no process behind. Each test lists the attempts its
program must make: one the agent keeps quiet about is not contained.
Techniques contained only by the sandbox carry `needs_sandbox`: skipped
where the host cannot sandbox (no bwrap, user namespaces off), failed where
it can and the daemon reports no sandbox.

The session ends with a table of techniques tried and contained.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from tests.escape import host as hostview
from tests.escape import runner
from tests.escape.conftest import CANARY, TAG, Escape
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


def _content_and_mtime(path: str | Path) -> tuple[bytes, int]:
    """A host file's bytes and mtime: what a write, or a read that writes, would change."""
    return Path(path).read_bytes(), os.stat(path).st_mtime_ns


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
    expected = ["tcp-127.0.0.1", "tcp-localhost-name", "udp-127.0.0.1", "vsock-socket",
                "packet-raw-socket", "inet-raw-socket",
                *(["tcp-::1"] if listeners.ports.get("tcp6_port") else []),
                f"abstract-unix:@{listeners.abstract_name}"]
    host: dict[str, Judge] = {
        "tcp-127.0.0.1": lambda a: blocked(a) and not heard["tcp"],
        "tcp-::1": lambda a: blocked(a) and not heard["tcp6"],
        "tcp-localhost-name": lambda a: blocked(a) and not (heard["tcp"] or heard["tcp6"]),
        "udp-127.0.0.1": lambda _a: not heard["udp"],
        f"abstract-unix:@{listeners.abstract_name}":
            lambda a: blocked(a) and not heard["abstract"],
    }
    escape.conclude(report, runner.verdicts(report, expected, host),
                    [f"the host's listeners heard {dict(heard)}"] if heard else [])


# ------------------------------------------------------------------ filesystem
@pytest.mark.needs_sandbox
def test_write_outside_scratch(escape: Escape) -> None:
    """The view is read-only: nothing written outside /scratch reaches the host.

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
    existing = ["/etc/passwd", "/usr/bin/python3", str(escape.programs / "write_outside.py")]
    before = {p: _content_and_mtime(p) for p in existing}
    agent = escape.run("write_outside.py", {
        "paths": paths, "own_program": str(escape.programs / "write_outside.py")})
    report = escape.report(agent)
    host: dict[str, Judge] = {}
    for p in paths:
        host[f"create:{p}"] = _absent_on_host(p)
        host[f"create-via-proc1-root:{p}"] = _absent_on_host(f"{p}-p1")
    host["mkdir:/etc"] = _absent_on_host(f"/etc/{tag}-dir")
    for p in existing:
        host[f"open-rw:{p}"] = lambda a, p=p: blocked(a) and _content_and_mtime(p) == before[p]
    extra = []
    if sorted(p.name for p in escape.programs.iterdir()) != listing:
        extra.append("the programs' directory changed")
    escape.conclude(report, runner.verdicts(report, host, host), extra)


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
    notes = {k.removeprefix("left:"): v for k, v in left.facts.items() if k.startswith("left:")}
    merged, expected, host = runner.Report(), [], {}
    for label, name in (("same-name", a.name), ("other-name", f"{a.name}-other")):
        b = escape.run("leave_note.py", {"mode": "read", "bystander_tag": bystander_tag},
                       name=name)
        found = escape.report(b)
        merged.attempts.update({f"{label}:{k}": Attempt(f"{label}:{k}", v.outcome, v.detail)
                                for k, v in found.attempts.items()})
        expected += [f"{label}:find-earlier-note:{w}"
                     for w in ("scratch", "home", "tmp", "var-tmp", "dev-shm")]
        expected += [f"{label}:find-bystander-file:{w}" for w in ("scratch", "tmp")]
        # The host looks for A's notes where B would find them: in B's own mount
        # namespace, through /proc/PID/root, while B runs.
        pid = escape.launched[b.name].main()
        for where, path in notes.items():
            seen = os.path.lexists(hostview.in_root(pid, path))
            host[f"{label}:find-earlier-note:{where}"] = (
                lambda a, seen=seen: blocked(a) and not seen)
    escape.conclude(merged, runner.verdicts(merged, expected, host), problems)


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
    before = {path: _content_and_mtime(path) for path in secrets.values()}
    d = escape.daemon
    state_dir = str(d.dir / "state")
    agent = escape.run("read_secrets.py", {
        "secrets": secrets, "daemon_pid": d.pid, "state_dir": state_dir})
    report = escape.report(agent)
    launched = escape.launched[agent.name]
    # The host resolves each spelling in the agent's own mount namespace and
    # procfs (/proc/PID/root): what it finds there is what the agent could open.
    pid = launched.main()
    hows = {"by-path": "", "after-chdir": "", "openat-dirfd": "",
            "via-proc1-root": "/proc/1/root", "via-daemon-root": f"/proc/{d.pid}/root"}
    expected = [f"{label}:{how}" for label in secrets for how in hows]
    expected += ["state-dir:listdir", *(f"daemon:{w}" for w in ("cwd", "fds", "environ", "mem",
                                                                 "maps"))]
    # Every escape test runs sandboxed (the bystander fixture skips where the
    # host cannot): hidden, not merely unreadable, and the host looks for itself.
    host: dict[str, Judge] = {}
    for label, path in secrets.items():
        for how, prefix in hows.items():
            leaks = _would_read(hostview.in_root(pid, prefix + path), before[path][0])
            host[f"{label}:{how}"] = (
                lambda a, leaks=leaks: blocked(a) and a.detail == "ENOENT" and not leaks)
    daemon_seen = os.path.lexists(hostview.in_root(pid, f"/proc/{d.pid}"))
    for what in ("cwd", "fds", "environ", "mem", "maps"):
        host[f"daemon:{what}"] = lambda a: blocked(a) and not daemon_seen
    entries = _listdir(hostview.in_root(pid, state_dir))
    host["state-dir:listdir"] = lambda a: blocked(a) and not entries
    # The files the daemon never writes itself must be as they were.
    static = [p for label, p in secrets.items() if label.endswith("trusted_keys")
              or label.startswith("policies/") or p == str(escape.secrets.private_key)]
    extra = [f"{p} changed on the host (content or mtime)" for p in static
             if _content_and_mtime(p) != before[p]]
    extra += [f"the canary is in the environment of process {pid}"
              for pid in launched.processes() if _environ_has(pid, CANARY)]
    escape.conclude(report, runner.verdicts(report, expected, host), extra)


@pytest.fixture
def planted(programs: Path) -> Iterator[dict[str, str]]:
    """A world-readable file, unique per test, in each host directory the view leaves out,
    and two beside the agents' code: in the code root, and in a directory next to theirs."""
    name = f"agentd-planted-{uuid.uuid4().hex[:8]}"
    parents = {d: Path(d) for d in ("/home", "/root", "/var/lib", "/srv", "/opt", "/mnt")}
    parents["code-root"] = programs.parent
    sibling = programs.parent / name
    sibling.mkdir(mode=0o755)
    parents["code-sibling"] = sibling
    made: dict[str, str] = {}
    try:
        for label, parent in parents.items():
            if parent.is_dir():
                path = parent / f"{name}.txt"
                path.write_text(f"private data {name}\n")
                path.chmod(0o644)
                made[label] = str(path)
        yield made
    finally:
        for path in made.values():
            with contextlib.suppress(OSError):
                os.unlink(path)
        shutil.rmtree(sibling, ignore_errors=True)


@pytest.mark.needs_sandbox
def test_read_host_data(escape: Escape, planted: dict[str, str]) -> None:
    """The view is the system's: no host data outside it opens, however readable on the host.

    World-readable files planted in /home, /root, /var/lib, /srv, /opt, /mnt,
    in the code root beside the agent's bound code and in a directory next
    to it: each must be absent from the agent's mount namespace (judged by
    the host through /proc/PID/root, not by the agent's word). /etc's
    secrets and host identity read empty: /dev/null lies over them. The
    agent's own code, bound read-only from the code root, reads.
    """
    etc = [p for p in ("/etc/shadow", "/etc/gshadow", "/etc/machine-id", "/etc/hostname")
           if os.path.isfile(p) and os.path.getsize(p)]
    own = str(escape.programs / "read_host_data.py")
    agent = escape.run("read_host_data.py", {"planted": planted, "etc_secrets": etc,
                                              "own_code": own})
    report = escape.report(agent)
    pid = escape.launched[agent.name].main()
    host: dict[str, Judge] = {}
    for label, path in planted.items():
        seen = os.path.lexists(hostview.in_root(pid, path))
        host[f"planted:{label}"] = (
            lambda a, seen=seen: blocked(a) and a.detail == "ENOENT" and not seen)
    for path in etc:
        leaks = _would_read(hostview.in_root(pid, path), Path(path).read_bytes())
        host[f"etc:{path}"] = lambda a, leaks=leaks: not leaks and (
            blocked(a) or a.detail == "read-0-bytes")
    extra = []
    if not report.facts.get("own-code", "").startswith("read-") or not os.path.isfile(
            hostview.in_root(pid, own)):
        extra.append(f"the agent cannot read its own code {own}: {report.facts.get('own-code')}")
    shown = set(report.facts.get("top-level", "").split(","))
    beyond = shown - {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run",
                      "sbin", "scratch", "tmp", "usr", "var", "srv"}
    if beyond:
        extra.append(f"the agent sees top-level entries beyond the view: {sorted(beyond)}")
    if os.path.lexists(hostview.in_root(pid, "/sys/fs/cgroup")):
        extra.append("the agent's view has /sys/fs/cgroup (other agents' cgroups)")
    escape.conclude(report, runner.verdicts(report, host, host), extra)


def _would_read(path: str, secret: bytes) -> bool:
    """Whether opening path (as the host, in the agent's view) yields the secret's bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return bool(secret) and data[:64] == secret[:64]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _environ_has(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


@pytest.fixture
def host_service(programs: Path) -> Iterator[HostListeners]:
    """A world-connectable Unix socket beside the agents' code (bound read-only), standing in
    for any host service's: a read-only mount does not stop connect(2) to a socket file."""
    ls = HostListeners(socket_path=f"{programs}/{TAG}-host-service.sock")
    yield ls
    ls.close()


def test_connect_to_the_control_socket(escape: Escape, host_service: HostListeners) -> None:
    """The control socket is out of reach (hidden): by path, via /proc roots, or by a scan.

    Peers' agents switched their sandbox off through an unauthenticated
    control channel. The agent also walks the filesystem it can see for
    socket files and tries each; the host keeps one, mode 0666, beside the
    agent's code (a read-only bind: the view shows no other host directory
    where one could be) for it to find: a Unix socket reached through the
    filesystem is a channel out of network = none.
    """
    d = escape.daemon
    assert d.socket.is_socket()
    d.stub.Info(agentd_pb2.InfoRequest(), timeout=5)  # the test's own connection, up
    accepted = hostview.unix_connections(d.pid, str(d.socket))
    agent = escape.run("control_socket.py", {
        "socket": str(d.socket), "daemon_pid": d.pid,
        "scan_roots": ["/run", "/var/run", "/tmp", "/var/tmp", "/srv", "/dev", "/root", "/home",
                       "/var/lib", "/etc", str(d.dir.parent), str(escape.programs)]})
    report = escape.report(agent)
    time.sleep(0.3)  # let the listener thread take anything still in flight
    heard = host_service.heard
    stand_in = f"socket-file:{host_service.socket_path}"
    # The program keeps every connection it made: the daemon's count of
    # accepted connections, read by the host, says whether any got through.
    d.stub.Info(agentd_pb2.InfoRequest(), timeout=5)
    more = hostview.unix_connections(d.pid, str(d.socket)) - accepted
    pid = escape.launched[agent.name].main()
    spellings = {"by-path": "", "via-proc1-root": "/proc/1/root",
                 "via-daemon-root": f"/proc/{d.pid}/root"}
    expected = [stand_in, *(f"daemon-socket:{how}" for how in spellings),
                "daemon-socket-seen:by-path", "daemon-socket-seen:via-proc1-root"]
    host: dict[str, Judge] = {stand_in: lambda a: blocked(a) and not heard["path"]}
    for how, prefix in spellings.items():
        seen = os.path.lexists(hostview.in_root(pid, prefix + str(d.socket)))
        host[f"daemon-socket:{how}"] = lambda a, seen=seen: blocked(a) and more <= 0 and not seen
        if how != "via-daemon-root":  # hidden, not merely refused
            host[f"daemon-socket-seen:{how}"] = (
                lambda a, seen=seen: blocked(a) and a.detail == "ENOENT" and not seen)
    extra = [f"the stand-in host service heard {heard['path']} connection(s)"] if (
        heard["path"]) else []
    if more > 0:
        extra.append(f"the daemon accepted {more} more connection(s) on its socket")
    escape.conclude(report, runner.verdicts(report, expected, host), extra)


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
    _signal_or_trace(escape, victims, broad=False)


_VICTIM_ATTEMPTS = ("kill-0", "SIGSTOP", "SIGKILL", "pidfd-SIGKILL", "ptrace-attach",
                    "ptrace-seize", "process_vm_readv", "proc-mem", "proc-environ")


def _signal_or_trace(escape: Escape, victims: dict[str, int], *, broad: bool) -> None:
    """Run signal_ptrace.py at victims; judge each attempt by the victim's /proc, read by the host.

    A signal that landed leaves the victim dead or stopped (another start
    time, State T); an attach leaves TracerPid set while the agent lives;
    memory and environ can only be read through a /proc that shows the
    victim, and the agent's procfs (its PID namespace) must not.
    """
    started = {pid: hostview.start_time(pid) for pid in victims.values()}
    agent = escape.run("signal_ptrace.py", {"victims": victims, "broad": broad})
    report = escape.report(agent)
    main = escape.launched[agent.name].main()
    expected = [f"{who}:{what}" for who in victims for what in _VICTIM_ATTEMPTS]
    if broad:
        expected += ["any-process:kill(-1,0)", "any-process:proc-scan", "own-child:ptrace-seize"]
    host: dict[str, Judge] = {}
    for who, pid in victims.items():
        st = hostview.status(pid)
        untouched = bool(st) and st.get("State", "")[:1] not in "tT" and (
            hostview.start_time(pid) == started[pid])
        untraced = st.get("TracerPid") == "0"
        unseen = not os.path.lexists(hostview.in_root(main, f"/proc/{pid}"))
        for what in ("kill-0", "SIGSTOP", "SIGKILL", "pidfd-SIGKILL"):
            host[f"{who}:{what}"] = lambda a, ok=untouched and unseen: blocked(a) and ok
        for what in ("ptrace-attach", "ptrace-seize"):
            host[f"{who}:{what}"] = lambda a, ok=untraced: blocked(a) and ok
        for what in ("process_vm_readv", "proc-mem", "proc-environ"):
            host[f"{who}:{what}"] = lambda a, ok=unseen: blocked(a) and ok
    extra = escape.launched[agent.name].privileges()
    escape.conclude(report, runner.verdicts(report, expected, host), extra)


@pytest.mark.needs_sandbox
def test_signal_or_trace_another_agent(escape: Escape) -> None:
    """Another agent, even under the same uid, is out of reach: its own PID namespace.

    The same attempts against every process of the bystander; then
    kill(-1, 0) (may the agent signal anyone at all?), kill(pid, 0) on every
    pid its /proc lists, and ptrace of its own child, which seccomp refuses.
    The bystander must run on, unstopped.
    """
    victims = {f"bystander-{i}": pid for i, pid in enumerate(escape.bystander.pids)}
    _signal_or_trace(escape, victims, broad=True)


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
    # With no_new_privs, execve(2) ignores the setuid bit (prctl(2)): the host
    # reads it, with the uids and capabilities, from every process of the agent.
    privileges = escape.launched[agent.name].privileges()
    host: dict[str, Judge] = {name: lambda a: blocked(a) and not privileges for name in (
        "setuid-copy-of-id", "su-root", "sudo", "passwd-status", "mount-setuid-tmpfs",
        "setuid-0")}
    escape.conclude(report, runner.verdicts(report, host, host), privileges)


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
    # Each attempt's child stays alive: the host reads the namespaces and the
    # mounts every process of the agent has now, against what bwrap made.
    launched = escape.launched[agent.name]
    changed = launched.namespace_changes()
    tagged = launched.mounts_with(escape.tag)
    own_root = os.readlink(f"/proc/{launched.main()}/root")
    rooted = [f"process {pid} has root {r}" for pid in launched.in_sandbox_pidns()
              if (r := _root_of(pid)) and r != own_root and pid not in launched.pids]
    ns_attempts = ["unshare-user", "unshare-user+mount", "unshare-user+net", "unshare-mount",
                   "unshare-pid+cgroup", "clone-newuser", "clone3-newuser",
                   *(f"setns-{who}-{ns}" for ns in ("mnt", "net", "pid", "user", "cgroup")
                     for who in ("init", "daemon"))]
    host: dict[str, Judge] = dict.fromkeys(ns_attempts, lambda a: blocked(a) and not changed)
    host["mount-tmpfs"] = lambda a: blocked(a) and not tagged
    host["pivot_root"] = host["chroot"] = lambda a: blocked(a) and not rooted
    expected = [*host, "open_tree-clone", "fsopen-tmpfs"]
    extra = [*changed, *(f"a mount with the tag appeared: {m}" for m in tagged), *rooted]
    if escape.tag in Path("/proc/self/mountinfo").read_text():
        extra.append(f"a mount with the tag appeared on the host: {escape.tag}")
    escape.conclude(report, runner.verdicts(report, expected, host), extra)


def _root_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return ""


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
    knob_writes = [(label, path) for label, path, _ in writes
                   if Path(path).name not in ("cgroup.procs", "cgroup.kill", "cgroup.freeze",
                                              "freezer.state")]
    before = {path: _read(path) for _, path in knob_writes if "{self}" not in path}
    agent = escape.run("cgroup_escape.py", {"writes": writes, "mkdirs": mkdirs},
                       pids=100, memory=256 * MIB)
    launched = escape.launched[agent.name]
    before.update({path: _read(path.replace("{self}", agent.id)) for _, path in knob_writes
                   if "{self}" in path})
    report = escape.report(agent)
    agent = escape.daemon.get(agent.name)
    # The host finds every process of the agent (the pids seen at launch, the
    # cgroups' members, every process of its PID namespace, and the pid the
    # program reports, mapped through NSpid) and reads /proc/PID/cgroup of each:
    # a process that moved out is no longer listed in the cgroup it left.
    reported = launched.host_pid(int(report.facts.get("pid", "0")))
    extra = launched.cgroup_escapes(() if reported is None else (reported,))
    if reported is None:
        extra.append(f"the host finds no process {report.facts.get('pid')} (the agent's own "
                     "pid, as it reports it) in the agent's PID namespace")
    moved = bool(extra)
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
    host: dict[str, Judge] = {label: lambda a: blocked(a) and not moved
                              for label, path, _ in writes if label.startswith("move-to:")}
    for label, path in knob_writes:
        real = path.replace("{self}", agent.id)
        host[label] = lambda a, p=real, was=before[path]: blocked(a) and _read(p) == was
    for label, path in mkdirs:
        real = path.replace("{self}", agent.id)
        host[label] = lambda a, p=real: blocked(a) and not os.path.lexists(p)
    bystander_ok = not escape.bystander.problems()  # alive, same processes, not frozen, beating
    host.update({label: lambda a: blocked(a) and bystander_ok
                 for label, _, _ in writes if label.startswith("bystander:")})
    expected_names = [label for label, _, _ in writes] + [label for label, _ in mkdirs]
    escape.conclude(report, runner.verdicts(report, expected_names, host), extra)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        return f"<{err.strerror}>"


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
    # The daemon still answers during the fork bomb (within the RPC's deadline,
    # a bound a loaded machine honours; no duration is asserted).
    extra: list[str] = []
    try:
        escape.daemon.stub.Info(agentd_pb2.InfoRequest(), timeout=30)
    except grpc.RpcError as err:
        extra.append(f"Info failed during the fork bomb: {err.code().name}")
    host: dict[str, Judge] = {"fork-past-pids-limit": lambda a: blocked(a) and count <= 64}
    if count > 64:
        extra.append(f"the agent holds {count} processes, over its pids limit of 64")
    escape.conclude(report, runner.verdicts(report, host, host), extra)


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
    # The daemon counts OOM kills from the cgroup's memory.events: the kernel's word.
    contained = {"exceed-memory-limit": "exceed-memory-limit" not in report.attempts
                 and ended.oom_kills >= 1}
    escape.conclude(report, runner.Verdicts.from_host(contained), extra)


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
    # The host measures each place in the agent's own mount namespace: a
    # read-only mount, or a filesystem no bigger than the cap.
    pid = escape.launched[agent.name].main()
    host: dict[str, Judge] = {}
    for label, where in (("fill-scratch", os.readlink(f"/proc/{pid}/cwd")), ("fill-tmp", "/tmp"),
                         ("fill-dev-shm", "/dev/shm"), ("fill-dev", "/dev"), ("fill-root", "/")):
        size, used = _fs_bytes(hostview.in_root(pid, where))
        capped = hostview.read_only(pid, where) or size <= applied + MIB
        host[label] = lambda a, ok=capped: blocked(a) and ok
        if not capped:
            extra.append(f"{where} in the sandbox is a writable {size // MIB} MiB filesystem, "
                         f"over the {applied // MIB} MiB cap")
        if label == "fill-scratch" and not used:
            extra.append("the agent could not write its scratch at all")
    escape.conclude(report, runner.verdicts(report, host, host), extra)


def _fs_bytes(path: str) -> tuple[int, int]:
    """Size and bytes in use of the filesystem holding path (statvfs(3))."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


# ------------------------------------------------------------------ kernel
def test_write_sysrq_and_sysctls(escape: Escape) -> None:
    """/proc/sysrq-trigger, /proc/sys, the hostname and the OOM score stay out of reach.

    sysrq "h" (help only), each sysctl rewritten with its own value,
    sethostname to the same name, oom_score_adj -1000, /sys knobs. The host
    then reads its hostname and core_pattern back.
    """
    sysctls = {f"sysctl:{name}": f"/proc/sys/{name}" for name in _SYSCTLS}
    before = {path: _read(path) for path in sysctls.values()}
    agent = escape.run("kernel_knobs.py", {})
    report = escape.report(agent)
    launched = escape.launched[agent.name]
    pid = launched.main()
    # The host reads each knob back, the agent's privileges from /proc, and
    # its view of /sys from its mountinfo (a read-only mount).
    # /proc/sys and /proc/sysrq-trigger belong to the host's root: bwrap covers
    # them read-only only where the sandbox's root could write them, so what
    # guards them is that the agent is neither root nor capable (from /proc).
    unprivileged = not launched.privileges()
    host: dict[str, Judge] = {}
    for label, path in sysctls.items():
        host[label] = lambda a, p=path: blocked(a) and _read(p) == before[p] and unprivileged
    host["sethostname"] = lambda a: blocked(a) and _read(sysctls["sysctl:kernel/hostname"]) == (
        before[sysctls["sysctl:kernel/hostname"]]) and unprivileged
    host["sysrq-trigger"] = lambda a: blocked(a) and unprivileged
    for label, path in (("sys-kernel-uevent_helper", "/sys/kernel/uevent_helper"),
                        ("sys-power-state", "/sys/power/state")):
        host[label] = lambda a, p=path: blocked(a) and (
            hostview.read_only(pid, p) or not os.path.lexists(hostview.in_root(pid, p)))
    lowered = [p for p in launched.processes() if _read(f"/proc/{p}/oom_score_adj") == "-1000"]
    host["oom_score_adj:-1000"] = lambda a: blocked(a) and not lowered
    extra = [f"{p} changed on the host" for p in sysctls.values() if _read(p) != before[p]]
    extra += [f"process {p} has oom_score_adj -1000" for p in lowered]
    extra += launched.privileges()
    escape.conclude(report, runner.verdicts(report, host, host), extra)


# As kernel_knobs.py rewrites them.
_SYSCTLS = ("kernel/core_pattern", "kernel/modprobe", "kernel/hostname", "kernel/domainname",
            "kernel/sysrq", "kernel/panic", "vm/overcommit_memory", "net/ipv4/ip_forward",
            "fs/suid_dumpable", "kernel/unprivileged_bpf_disabled")


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
    devices = _host_devices()
    major, minor = _root_disk()
    agent = escape.run("kernel_surface.py", {"devices": devices, "root_disk": (major, minor)})
    report = escape.report(agent)
    pid = escape.launched[agent.name].main()
    # The host looks at the agent's /dev: a device it does not show cannot be opened.
    shown = {d: _is_device(hostview.in_root(pid, d)) for d in devices if d.startswith("/dev/")}
    host: dict[str, Judge] = {f"open-device:{d}": lambda a, seen=seen: blocked(a) and not seen
                              for d, seen in shown.items()}
    cwd = os.readlink(f"/proc/{pid}/cwd")
    for label, name in (("mknod:char-1:1-mem", "mem"),
                        (f"mknod:block-{major}:{minor}-host-disk", "disk")):
        made = os.path.lexists(hostview.in_root(pid, f"{cwd}/{escape.tag}-{name}"))
        host[label] = lambda a, made=made: blocked(a) and not made
    expected = [*(f"open-device:{d}" for d in devices), *host, "tiocsti:/dev/tty",
                *(f"tiocsti:fd{fd}" for fd in (0, 1, 2)), "open_by_handle_at-shocker",
                "add_key", "keyctl-get-session-keyring", "bpf-map-create",
                "perf_event_open-self", "io_uring_setup", "userfaultfd-user-mode",
                "kexec_load-bad-flags", "init_module-null", "finit_module-bad-fd",
                "delete_module-missing", "reboot-bad-magic", "swapon-missing",
                "raise-rlimit-nofile", *(["iopl-3"] if os.uname().machine == "x86_64" else [])]
    escape.conclude(report, runner.verdicts(report, expected, host),
                    escape.launched[agent.name].privileges())


def _is_device(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


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
    # The same questions, asked of /proc by the host.
    launched = escape.launched[agent.name]
    pid = launched.main()
    st = hostview.status(pid)
    caps = ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd")
    ns_now = hostview.ns_links(pid)
    links = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    interfaces = {line.split(":")[0].strip() for line in links}
    host: dict[str, Judge] = {
        "runs-as-root": lambda a: blocked(a) and "0" not in st.get("Uid", "0").split(),
        "no_new_privs-off": lambda a: blocked(a) and st.get("NoNewPrivs") == "1",
        "seccomp-off": lambda a: blocked(a) and st.get("Seccomp") == "2",
        "host-interfaces-visible": lambda a: blocked(a) and interfaces <= {"lo"},
        "daemon-env-canary": lambda a: blocked(a) and not any(
            _environ_has(p, CANARY) for p in launched.processes()),
    }
    for cap in caps:
        host[f"capabilities:{cap}"] = lambda a, c=cap: blocked(a) and not int(st.get(c, "1"), 16)
    for ns in ("pid", "net", "mnt"):
        host[f"host-{ns}-namespace"] = lambda a, n=ns: blocked(a) and ns_now.get(n) not in (
            None, host_ns[n])
    escape.conclude(report, runner.verdicts(report, host, host), extra)


@pytest.mark.needs_sandbox
@pytest.mark.parametrize("omit", ["network", "seccomp", "pid", "view", "masks"])
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
            escape.conclude(None, runner.Verdicts.from_host({f"launch-without-{omit}": refused}),
                            [] if refused else [f"launch failed otherwise: {err.details()}"])
            return
        report = runner.wait_report(d, agent)
        claimed = "; ".join(f"{c.name}={'ok' if c.ok else 'NOT ok'}"
                            for c in d.get(agent.name).sandbox.checks)
        problems = runner.end_agent(d, d.get(agent.name))
        escape.conclude(None, runner.Verdicts.from_host({f"launch-without-{omit}": False}), [
            f"the daemon ran an agent without {omit}; it claimed: {claimed}",
            "inside: " + ", ".join(f"{a.name} {a.outcome}" for a in report.attempts.values()
                                   if a.outcome != "BLOCKED"), *problems])
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
