"""What the host sees of an agent: /proc, cgroupfs and the daemon's sockets, never its output.

An escape program's report is the agent's word. These readers are the
host's: taken from outside the sandbox, as root, they are the evidence the
escape tests judge by wherever the outcome leaves a trace.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from agentd.v1 import agentd_pb2

from tests.harness import pids_in

# namespaces(7); pid_for_children is where unshare(CLONE_NEWPID) shows before any fork.
NAMESPACES = ("user", "mnt", "net", "pid", "pid_for_children", "cgroup", "ipc", "uts")


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def ns_links(pid: int) -> dict[str, str]:
    """The targets of /proc/PID/ns/* ({} once the process is gone)."""
    out = {}
    for ns in NAMESPACES:
        with contextlib.suppress(OSError):
            out[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
    return out


def start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, names one process across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]


def _nspid(pid: int) -> list[int]:
    return [int(x) for x in status(pid).get("NSpid", "").split()]


def mounts(pid: int) -> list[tuple[str, str, str]]:
    """(mount point, fstype, mount and super options) of each line of /proc/PID/mountinfo."""
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        fields, sup = pre.split(), post.split()
        if len(fields) >= 6 and len(sup) >= 3:
            out.append((fields[4].replace("\\040", " "), sup[0], f"{fields[5]},{sup[2]}"))
    return out


def in_root(pid: int, path: str) -> str:
    """path as PID sees it, for the host to open: under /proc/PID/root, symlinks resolved there.

    The kernel would resolve an absolute symlink met under /proc/PID/root
    against the host's root (the reader's), not the agent's: each is followed
    by hand, inside the agent's root (as openat2(2) RESOLVE_IN_ROOT would).
    """
    root = f"/proc/{pid}/root"
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    for _ in range(40):  # symlink hops, as the kernel's MAXSYMLINKS
        if not parts:
            break
        part = parts.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        candidate = root + "/" + "/".join([*done, part])
        try:
            target = os.readlink(candidate)
        except OSError:  # not a symlink, or absent: taken as it is
            if part != ".":
                done.append(part)
            continue
        more = [p for p in target.split("/") if p]
        if target.startswith("/"):
            done = []
        parts = more + parts
    return root + "/" + "/".join(done)


def mount_of(pid: int, path: str) -> tuple[str, str, str]:
    """The mount that holds path in PID's mount namespace: the last, longest prefix."""
    best = ("", "", "")
    for mp, fs, opts in mounts(pid):
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(best[0]):
            best = (mp, fs, opts)
    return best


def read_only(pid: int, path: str) -> bool:
    """Whether path is on a read-only mount in PID's mount namespace (its mount options)."""
    return "ro" in mount_of(pid, path)[2].split(",")[:1]


def unix_connections(daemon_pid: int, path: str) -> int:
    """Connections the daemon accepted on its socket at path, from its /proc/PID/net/unix.

    An accepted socket carries its listener's address (unix(7)); state 03 is
    SS_CONNECTED. The host's count, not the agent's word for a refused connect.
    """
    n = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{daemon_pid}/net/unix").read_text().splitlines()[1:]:
            words = line.split()
            if len(words) >= 8 and words[5] == "03" and words[7] == path:
                n += 1
    return n


@dataclass
class Launched:
    """An agent's processes as the host saw them right after launch, and checks against that.

    sandbox_ns: the namespaces of the sandbox's init (pid 1 of its PID
    namespace), which bwrap created; {} when the agent has no PID namespace.
    """

    agent: agentd_pb2.Agent
    pids: dict[int, str] = field(default_factory=dict)        # pid -> start time
    links: dict[int, dict[str, str]] = field(default_factory=dict)
    sandbox_ns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls, agent: agentd_pb2.Agent) -> Launched:
        """Record the agent's processes (Run returns once its program has exec'd)."""
        out = cls(agent)
        for pid in pids_in(agent.cgroup_paths[0]):
            out.pids[pid] = start_time(pid)
            out.links[pid] = ns_links(pid)
            if _nspid(pid)[1:] and _nspid(pid)[-1] == 1:
                out.sandbox_ns = dict(out.links[pid])
        return out

    def _same(self, pid: int) -> bool:
        return pid in self.pids and start_time(pid) == self.pids[pid]

    def in_sandbox_pidns(self) -> list[int]:
        """Every host process in the sandbox's PID namespace, whatever its cgroup."""
        want = self.sandbox_ns.get("pid")
        if not want:
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "pid") == want:
                        out.append(int(entry.name))
        return out

    def processes(self) -> list[int]:
        """Launch pids still the same processes, the cgroup's members now, the PID namespace's."""
        found = {p for p in self.pids if self._same(p)}
        for path in self.agent.cgroup_paths:
            found.update(pids_in(path))
        found.update(self.in_sandbox_pidns())
        return sorted(found)

    def host_pid(self, ns_pid: int) -> int | None:
        """The host pid of the process the agent calls ns_pid (NSpid, proc(5)), in any cgroup."""
        for pid in self.in_sandbox_pidns():
            nspid = _nspid(pid)
            if nspid and nspid[-1] == ns_pid:
                return pid
        return None

    # ------------------------------------------------------------ checks
    def cgroup_escapes(self, extra_pids: tuple[int, ...] = ()) -> list[str]:
        """Every process of the agent, found from the host, is in each of its cgroups."""
        out = []
        for pid in sorted({*self.processes(), *extra_pids}):
            for path in self.agent.cgroup_paths:
                members = pids_in(path)
                if pid not in members and start_time(pid):
                    cg = Path(f"/proc/{pid}/cgroup").read_text(errors="replace").strip()
                    out.append(f"process {pid} left {path} (/proc/{pid}/cgroup: "
                               f"{cg.replace(chr(10), '; ')})")
        return out

    def namespace_changes(self) -> list[str]:
        """No process of the agent is in a namespace bwrap did not make for it.

        Processes of the sandbox's PID namespace (and any child of one in a
        nested one, still in the cgroup) must be in the sandbox init's
        namespaces; bwrap's outer process in those it had at launch.
        """
        out = []
        for pid in self.processes():
            now = ns_links(pid)
            if not now:
                continue
            want = self.links[pid] if self._same(pid) and pid not in self.in_sandbox_pidns() \
                else self.sandbox_ns
            diff = {ns: now[ns] for ns in NAMESPACES
                    if ns in now and ns in want and now[ns] != want[ns]}
            if diff:
                out.append(f"process {pid} is in namespaces bwrap did not make: {diff}")
        return out

    def privileges(self) -> list[str]:
        """The agent's own processes: no root uid, no capabilities, no_new_privs, seccomp."""
        out = []
        for pid in self.in_sandbox_pidns():
            st = status(pid)
            if not st or _nspid(pid)[-1:] == [1]:
                continue  # gone, or bwrap's init (no seccomp: it runs no agent code)
            uids = st.get("Uid", "").split()
            wrong = [f"Uid {st.get('Uid')}"] if "0" in uids else []
            wrong += [f"{cap} {st.get(cap)}" for cap in ("CapEff", "CapPrm", "CapAmb")
                      if int(st.get(cap, "0"), 16)]
            wrong += [] if st.get("NoNewPrivs") == "1" else [f"NoNewPrivs {st.get('NoNewPrivs')}"]
            wrong += [] if st.get("Seccomp") == "2" else [f"Seccomp {st.get('Seccomp')}"]
            if wrong:
                out.append(f"process {pid} ({st.get('Name')}): " + ", ".join(wrong))
        return out

    def mounts_with(self, text: str) -> list[str]:
        """Mounts of any of the agent's processes whose mount point carries text."""
        return sorted({f"{mp} ({fs}) in /proc/{pid}/mountinfo" for pid in self.processes()
                       for mp, fs, _ in mounts(pid) if text in mp})

    def main(self) -> int:
        """A live process of the agent's own (not bwrap's), for /proc/PID/root and mountinfo."""
        for pid in self.in_sandbox_pidns():
            if _nspid(pid)[-1:] != [1]:
                return pid
        return self.agent.main_pid
