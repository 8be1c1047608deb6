"""Check from outside that an agent's sandbox is in place: /proc and cgroupfs, read as root.

Peer sandboxes have shipped with restrictions silently not applied while
reporting success. So nothing here asks bwrap or the agent: the daemon reads
what the kernel shows of every process in the agent's cgroup (proc(5)):

- /proc/PID/status: Uid, Gid and Groups are the agent's; CapEff, CapPrm,
  CapInh and CapAmb are 0; NoNewPrivs is 1; Seccomp is 2 (filter mode).
  CapBnd is reported, not required: capabilities held in the agent's own user
  namespace would count only for what that namespace owns
  (user_namespaces(7)), and with no permitted or ambient capabilities,
  no_new_privs set and a non-zero uid inside, no execve(2) can raise them;
  bwrap's --cap-drop ALL empties it anyway.
- /proc/PID/ns/*: mnt, pid, ipc, uts, user (and net, for network "none")
  differ from the daemon's own /proc/self/ns/* (namespaces(7)).
- /proc/PID/limits: Max open files is the profile's nofile, soft and hard.
- /proc/PID/mountinfo, once per mount namespace: exactly the view's mounts,
  each with its filesystem type and read-only flag, each bind and mask
  showing its source's filesystem and path as the daemon's own mountinfo
  places it (daemon.sandbox.mountinfo); through /proc/PID/root, each symlink
  points where the view says.
- cgroupfs: the memory, swap, pids and cpu limits read back.

bwrap's outer process (the agent's main pid, which the daemon watches) stays
in the host's namespaces and never runs agent code; it is held to the user,
capability and no_new_privs checks only. Every other member of the cgroup
(bwrap's init, pid 1 of the agent's PID namespace, and the agent's own
processes) is held to all of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.cgroups.limits import Limits
from daemon.cgroups.tree import AgentCgroup
from daemon.errors import CgroupError
from daemon.sandbox import mountinfo
from daemon.sandbox.bwrap import Mount

NAMESPACES = ("mnt", "pid", "ipc", "uts", "user", "net")
_NS_CHECK = {k: f"{'network' if k == 'net' else k} namespace" for k in NAMESPACES}
_ZERO_CAPS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
_POLL_S = 0.0005
# A check that fails is read again for this long before it counts: a process
# caught between bwrap's fork and its exec is not yet what it will be.
_SETTLE_S = 0.2


@dataclass(frozen=True)
class Check:
    """One restriction as the kernel shows it."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Expected:
    """What the profile asked for."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    network: str
    nofile: int
    limits: Limits
    view: tuple[Mount, ...] = ()
    # network "allowlist": the inode of the namespace the daemon made.
    netns_inode: int = 0


@dataclass(frozen=True)
class Report:
    """An agent's sandbox: what was asked for, and each restriction as checked from outside."""

    policy: str
    network: str
    user: str  # a named user, or "dynamic:UID"
    scratch_bytes: int
    entrypoint: str
    entrypoint_sha256: str
    looser: tuple[str, ...]
    checks: tuple[Check, ...]
    view: tuple[Mount, ...] = ()

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


class _Gone(Exception):
    """The process exited while it was being read."""


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise _Gone from err
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _ns(pid: int | str, kind: str) -> str | None:
    """The namespace's "type:[inode]"; None when it may not be read.

    Reading it needs ptrace read access (proc(5)): root without
    CAP_SYS_PTRACE gets EACCES, and a restriction nobody can see fails.
    """
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except (FileNotFoundError, ProcessLookupError) as err:
        raise _Gone from err
    except PermissionError:
        return None


def _nofile(pid: int) -> tuple[str, str]:
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise _Gone from err
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft, hard = line[len("Max open files"):].split()[:2]
            return soft, hard
    return "?", "?"


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_for_agent(group: AgentCgroup, main_pid: int, helper_cmdline: bytes,
                   timeout: float) -> list[int] | None:
    """Wait until a process of the agent's own has exec'd; its cgroup's pids, or None.

    bwrap forks: its outer process (main_pid), then its init and the agent's
    first process, which run bwrap's code until the execve(2) of the agent;
    after that their command line is no longer bwrap's. None when the main
    process ended first (the agent ran and exited, or bwrap failed) or the
    timeout passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            members = group.pids()
        except CgroupError:
            return None
        if main_pid not in members:
            return None
        if any(p != main_pid and cmdline(p) not in (helper_cmdline, b"") for p in members):
            return members
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_S)


def _read_mountinfo(pid: int | str) -> list[mountinfo.Entry]:
    try:
        return mountinfo.parse(Path(f"/proc/{pid}/mountinfo").read_text())
    except (FileNotFoundError, ProcessLookupError) as err:
        raise _Gone from err


def _symlink_problem(pid: int, m: Mount) -> str:
    """What is wrong with the symlink m as PID sees it (through /proc/PID/root); "" if nothing.

    Only symlinks are looked up by path: they lie on bwrap's root, which its
    owner (the agent) made searchable. The daemon may lack CAP_DAC_READ_SEARCH
    (agentd.service), and directories bwrap makes below it for a bind follow
    the caller's umask: mounts are judged by mountinfo alone.
    """
    try:
        target = os.readlink(f"/proc/{pid}/root{m.path}")
    except (FileNotFoundError, ProcessLookupError) as err:
        if not os.path.exists(f"/proc/{pid}"):
            raise _Gone from err
        return f"{m.path}: missing in the sandbox"
    except OSError as err:
        return f"{m.path}: not a symlink, or unreadable from the host: {err.strerror}"
    return "" if target == m.source else f"{m.path} -> {target}, not {m.source}"


def view_problems(pid: int, view: Sequence[Mount]) -> list[str]:
    """Each way PID's mount namespace differs from view, read from the host; [] if none.

    Raises _Gone if the process exits meanwhile.
    """
    entries = _read_mountinfo(pid)
    problems = mountinfo.compare(view, entries, _read_mountinfo("self"))
    problems += [p for p in (_symlink_problem(pid, m) for m in view if m.kind == "symlink")
                 if p]
    return problems


def network_view_problems(pid: int) -> list[str]:
    """Each interface other than lo, and each route not via lo, in PID's namespace.

    Read from /proc/PID/net (proc(5)), which shows the namespace of PID:
    an allowlist agent's only way out is agentd's capture on lo.
    """
    problems = []
    try:
        dev = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
        route = Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:]
        route6 = Path(f"/proc/{pid}/net/ipv6_route").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise _Gone from err
    ifaces = [line.split(":", 1)[0].strip() for line in dev if ":" in line]
    problems += [f"interface {i}" for i in ifaces if i != "lo"]
    problems += [f"IPv4 route via {f[0]}" for f in (ln.split() for ln in route)
                 if f and f[0] != "lo"]
    problems += [f"IPv6 route via {f[-1]}" for f in (ln.split() for ln in route6)
                 if f and f[-1] != "lo"]
    return problems


def _view_summary(view: Sequence[Mount]) -> str:
    binds = [m for m in view if m.kind == "bind"]
    masked = sum(1 for m in view if m.kind in ("mask", "hide"))
    rw = [m.path for m in view if m.writable and m.kind in ("bind", "tmpfs")]
    return (f"mountinfo shows exactly the view: {len(binds)} bind(s) "
            f"({' '.join(m.path for m in binds)}), {masked} path(s) masked; "
            f"writable: {' '.join(rw)}")


def _process_checks(pids: list[int], main_pid: int, want: Expected) -> list[Check]:
    own = {k: _ns("self", k) for k in NAMESPACES}
    bad: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    checked = 0
    views_seen: set[str | None] = set()
    nets_seen: set[str] = set()

    def fail(name: str, what: str) -> None:
        bad.setdefault(name, []).append(what)

    for pid in pids:
        try:
            st = _status(pid)
            sandboxed = pid != main_pid
            ids = {"Uid": want.uid, "Gid": want.gid}
            for key, value in ids.items():
                fields = st.get(key, "").split()
                if fields != [str(value)] * 4:
                    fail("user", f"pid {pid} {key} {' '.join(fields)}")
            groups = tuple(sorted(int(g) for g in st.get("Groups", "").split()))
            if groups != tuple(sorted(want.groups)):
                fail("user", f"pid {pid} Groups {' '.join(map(str, groups)) or 'none'}")
            for cap in _ZERO_CAPS:
                if int(st.get(cap, "f"), 16) != 0:
                    fail("capabilities", f"pid {pid} {cap} {st.get(cap)}")
            seen["CapBnd"] = st.get("CapBnd", "?")
            if st.get("NoNewPrivs") != "1":
                fail("no_new_privs", f"pid {pid} NoNewPrivs {st.get('NoNewPrivs')}")
            if sandboxed:
                if st.get("Seccomp") != "2":
                    fail("seccomp", f"pid {pid} Seccomp {st.get('Seccomp')}")
                for kind in NAMESPACES:
                    theirs = _ns(pid, kind)
                    shared = theirs == own[kind]
                    label = _NS_CHECK[kind]
                    if theirs is None:
                        fail(label, f"pid {pid}: /proc/{pid}/ns/{kind} unreadable "
                                    "(the daemon needs CAP_SYS_PTRACE)")
                    elif kind == "net" and want.network == "host":
                        if not shared:
                            fail(label, f"pid {pid} not in the host's {own[kind]}")
                    elif kind == "net" and want.network == "allowlist":
                        if theirs != f"net:[{want.netns_inode}]":
                            fail(label, f"pid {pid} in {theirs}, not agentd's "
                                        f"net:[{want.netns_inode}]")
                        elif theirs not in nets_seen:
                            nets_seen.add(theirs)
                            for problem in network_view_problems(pid):
                                fail(label, f"pid {pid}: {problem}")
                    elif shared:
                        fail(label, f"pid {pid} shares the daemon's {theirs}")
                soft, hard = _nofile(pid)
                if soft != str(want.nofile) or hard != str(want.nofile):
                    fail("nofile", f"pid {pid} Max open files {soft}/{hard}")
                mnt = _ns(pid, "mnt")
                if want.view and mnt not in views_seen:
                    for problem in view_problems(pid, want.view):
                        fail("filesystem view", f"pid {pid}: {problem}")
                    views_seen.add(mnt)
            checked += 1
        except _Gone:
            continue
        except OSError as err:
            fail("processes", f"pid {pid}: cannot read /proc: {err.strerror}")
    if not checked:
        return [Check("processes", True, "the agent exited before its processes could be read; "
                                         "only the cgroup limits were checked")]
    n = f"{checked} process(es)"
    who = f"uid {want.uid} gid {want.gid} groups {' '.join(map(str, want.groups)) or 'none'}"
    net = {"host": "the host's network, as the policy says",
           "allowlist": f"agentd's namespace net:[{want.netns_inode}]: only lo, every route "
                        "via lo (all traffic through agentd's capture)"}.get(
        want.network, "own network namespace (loopback only)")
    good = {
        "user": f"{who} in {n}",
        "capabilities": f"CapEff CapPrm CapInh CapAmb 0 in {n} (CapBnd {seen.get('CapBnd')})",
        "no_new_privs": f"NoNewPrivs 1 in {n}",
        "seccomp": "filter (Seccomp 2) in every sandboxed process",
        "pid namespace": "own PID namespace",
        "mnt namespace": "own mount namespace",
        "ipc namespace": "own IPC namespace",
        "uts namespace": "own UTS namespace",
        "user namespace": "own user namespace",
        "network namespace": net,
        "nofile": f"RLIMIT_NOFILE {want.nofile}/{want.nofile}",
    }
    if want.view:
        good["filesystem view"] = _view_summary(want.view)
    # A failure under a name without a description must never vanish.
    good.update({name: "" for name in bad if name not in good})
    return [Check(name, name not in bad, "; ".join(bad[name][:3]) if name in bad else detail)
            for name, detail in good.items()]


def _limit_checks(group: AgentCgroup, want: Limits) -> list[Check]:
    try:
        have = group.read_limits()
    except CgroupError as err:
        if not group.populated():
            # Ended and already reaped: its cgroups went with it.
            return [Check("cgroup limits", True, "not read back: the agent had ended and its "
                                                 "cgroups were removed")]
        return [Check("cgroup limits", False, f"cannot read back: {err.message}")]
    out = []
    mem = have["memory"]
    if want.memory_bytes:
        out.append(Check("memory", mem == str(want.memory_bytes), f"limit {mem} bytes"))
        swap = have["swap"]
        if swap.startswith("memsw "):
            ok = swap.removeprefix("memsw ") == str(want.memory_bytes)
            out.append(Check("swap", ok, f"memory+swap capped at {swap.removeprefix('memsw ')} "
                                         "(no swap beyond the memory limit)"))
        elif swap.startswith("swap.max "):
            out.append(Check("swap", swap == "swap.max 0", swap))
        else:
            out.append(Check("swap", True, f"{swap}: swap cannot be limited per cgroup here"
                                           f"{_swap_note()}"))
    else:
        out.append(Check("memory", True, f"no limit asked ({mem})"))
        if have["swap"].startswith("swap.max "):
            out.append(Check("swap", have["swap"] == "swap.max 0", have["swap"]))
    if want.pids_max:
        out.append(Check("pids", have["pids"] == str(want.pids_max), f"pids.max {have['pids']}"))
    if want.cpu_millis:
        out.append(Check("cpu", have["cpu"] not in ("-", "max", "-1"), f"quota {have['cpu']}"))
    return out


def _swap_note() -> str:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return ""
    return "; the host has no swap" if not lines else "; the host HAS swap"


def check(group: AgentCgroup, main_pid: int, pids: list[int], want: Expected) -> list[Check]:
    """Every restriction, read from outside. A failed one is read again for a moment first."""
    deadline = time.monotonic() + _SETTLE_S
    while True:
        checks = _process_checks(pids, main_pid, want)
        if all(c.ok for c in checks) or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
        try:
            pids = group.pids()
        except CgroupError:
            break
    return checks + _limit_checks(group, want.limits)
