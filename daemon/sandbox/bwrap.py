"""The bubblewrap command line that puts one agent in its sandbox (bwrap(1)).

bwrap runs unprivileged: the shim, still root, joins the agent's cgroups,
drops to the agent's uid, gid and groups, sets no_new_privs, and only then
execs bwrap. bwrap then creates a user namespace owned by the agent's uid
(user_namespaces(7)), and the other namespaces and mounts inside it, with
capabilities that count only there. Run as root with --unshare-user --uid N
instead, the sandbox's uid N would map to the caller outside: real root.

What the agent gets (docs/sandbox.md):
- a read-only view of the host: every top-level entry of / bound read-only,
  except those made private below;
- private /proc (its own PID namespace: it sees and signals only its own
  processes), a minimal read-only /dev with a capped /dev/shm, an empty
  read-only /run, a read-only root;
- /scratch, a tmpfs capped at the profile's scratch size, /tmp inside it, and
  a private capped /var/tmp;
  both vanish with the agent's mount namespace, so nothing carries over;
- the daemon's own files hidden under empty read-only tmpfs mounts;
- no network but loopback (network = "none"), its own IPC, UTS and cgroup
  namespaces, a new session (no TIOCSTI into a terminal), no capabilities;
- the daemon's seccomp filter, loaded by bwrap right before it execs the agent.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import LaunchFailed
from daemon.sandbox.policy import Profile

BWRAP = "/usr/bin/bwrap"
SCRATCH = "/scratch"
TMP = "/tmp"
# Top-level host entries the sandbox never shows from the host: the kernel's
# views and the shared writable places are replaced with private ones.
PRIVATE = frozenset({"proc", "dev", "tmp", "run", "scratch", "lost+found"})
# What the test-only config knob sandbox_test_omit may leave out.
OMITTABLE = ("seccomp", "network", "pid")


@dataclass(frozen=True)
class Hidden:
    """A daemon path no agent may see: an empty tmpfs over a directory, /dev/null over a file."""

    path: str
    is_dir: bool


def _userns_problem() -> str:
    """Why unprivileged user namespaces are unavailable here, or ""."""
    knobs = {
        # Debian and Ubuntu kernels before 6.x: 0 forbids them to non-root.
        "/proc/sys/kernel/unprivileged_userns_clone": "0",
        # user_namespaces(7): 0 forbids new user namespaces altogether.
        "/proc/sys/user/max_user_namespaces": "0",
    }
    for path, bad in knobs.items():
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == bad:
            return (f"{path} is {bad}: unprivileged user namespaces are off, and bwrap needs "
                    "them to build an agent's sandbox without root")
    return ""


def available() -> str:
    """Why agents cannot be sandboxed on this host, or "" when they can."""
    if not os.access(BWRAP, os.X_OK):
        return f"{BWRAP} is missing: install the bubblewrap package"
    st = os.stat(BWRAP)
    if st.st_mode & stat.S_ISUID:
        # Setuid bwrap runs its setup as root: not the mode this design
        # assumes (no_new_privs also makes the setuid bit void).
        return f"{BWRAP} is setuid root; agentd needs the ordinary, unprivileged bwrap"
    return _userns_problem()


def _host_view(root: str = "/") -> list[str]:
    """--ro-bind / --symlink for each top-level host entry the sandbox shows read-only."""
    args: list[str] = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name in PRIVATE:
            continue
        dest = "/" + e.name
        if e.is_symlink():
            # Merged /usr: /bin -> usr/bin and the like stay symlinks.
            args += ["--symlink", os.readlink(e.path), dest]
        elif e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False):
            args += ["--ro-bind", e.path, dest]
    return args


def visible(path: str, root: str = "/") -> bool:
    """Whether path would be reachable in the sandbox's read-only host view."""
    top = path.strip("/").split("/", 1)[0]
    return bool(top) and top not in PRIVATE and os.path.lexists(os.path.join(root, top))


def reachable(path: str, uid: int, gids: Iterable[int]) -> bool:
    """Whether uid (with gids) may search every directory above path (mode bits only).

    bwrap runs as the agent's uid: it could not even look up a mount point
    below a directory the agent may not search, and needs not hide what the
    agent cannot reach.
    """
    groups = set(gids)
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            return False
        bit = (stat.S_IXUSR if st.st_uid == uid else
               stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH)
        if not st.st_mode & bit:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def argv(
    profile: Profile,
    command: Sequence[str],
    *,
    seccomp_fd: int,
    hidden: Iterable[Hidden],
    uid: int,
    gids: Iterable[int] = (),
    omit: str = "",
) -> list[str]:
    """The full argv: bwrap, its options, "--", then the agent's command.

    omit (testing only, from sandbox_test_omit) leaves one restriction out so
    that the checks from outside can be shown to catch it.
    """
    # No --hostname: under systemd's ProtectHostname= (agentd.service)
    # sethostname(2) is refused even inside a new UTS namespace.
    a = [BWRAP, "--unshare-user", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if omit != "pid":
        a.append("--unshare-pid")
    if profile.network == "none" and omit != "network":
        # A new network namespace: bwrap brings its loopback up, nothing else.
        a.append("--unshare-net")
    # Not --disable-userns: it writes /proc/sys/user/max_user_namespaces,
    # which systemd's ProtectKernelTunables= (agentd.service) makes read-only.
    # The seccomp filter refuses new user namespaces instead.
    # No --die-with-parent: it is PR_SET_PDEATHSIG, which fires when the
    # parent *thread* exits (prctl(2)), here whichever daemon thread spawned
    # the shim. The daemon watches bwrap's outer process instead, and kills
    # the whole cgroup when it exits. --new-session: no TIOCSTI into a
    # terminal the agent was started from (CVE-2017-5226).
    a += ["--new-session", "--cap-drop", "ALL"]
    a += _host_view()
    size = str(profile.scratch_bytes)
    # Every writable place is a tmpfs capped at the scratch size, and its
    # pages count against the agent's memory cgroup: bwrap's own root and
    # --dev would otherwise be tmpfs mounts of half the host's RAM each.
    a += ["--proc", "/proc", "--dev", "/dev",
          "--size", size, "--tmpfs", "/dev/shm",
          "--tmpfs", "/run",
          "--size", size, "--tmpfs", SCRATCH,
          "--dir", SCRATCH + TMP, "--symlink", SCRATCH + TMP, TMP]
    if os.path.isdir("/var/tmp") and not os.path.islink("/var/tmp"):
        # The other world-writable host directory: private like /tmp, so
        # nothing the host or another agent leaves there is seen or reached.
        a += ["--size", size, "--tmpfs", "/var/tmp"]
    for p in profile.bind_ro:
        a += ["--ro-bind", p, p]
    for p in profile.bind_rw:
        a += ["--bind", p, p]
    # Last, so that no bind above can show them again.
    gids = tuple(gids)
    for h in hidden:
        if not visible(h.path) or not reachable(h.path, uid, gids):
            continue
        if h.is_dir:
            a += ["--tmpfs", h.path, "--remount-ro", h.path]
        else:
            a += ["--ro-bind", "/dev/null", h.path]
    # After the binds: a bind below /run needs its mount point made first;
    # --remount-ro is not recursive, so such a bind keeps its own mode.
    # --remount-ro is not recursive: the scratch, /tmp, /var/tmp and /dev/shm
    # mounts stay writable; bwrap's root and /dev (where a file could
    # otherwise be made anywhere) become read-only.
    a += ["--remount-ro", "/run", "--remount-ro", "/dev", "--remount-ro", "/",
          "--chdir", SCRATCH]
    if omit != "seccomp":
        a += ["--seccomp", str(seccomp_fd)]
    return [*a, "--", *command]


def hidden_paths(paths: Iterable[tuple[Path, bool]]) -> list[Hidden]:
    """Hidden entries for the daemon's files: (path, whether to hide its whole directory).

    A directory that holds other things too (/etc, /var/log...) is never
    blanked: the file alone is hidden then.
    """
    system = {"/", "/etc", "/var", "/var/lib", "/var/log", "/run", "/tmp", "/usr", "/opt",
              "/home", "/srv", "/root", "/var/tmp", "/var/run"}
    out: dict[str, Hidden] = {}
    for path, whole_dir in paths:
        p = Path(os.path.normpath(path))
        if whole_dir and str(p.parent) not in system:
            out.setdefault(str(p.parent), Hidden(str(p.parent), True))
        elif p.is_dir():
            if str(p) not in system:
                out.setdefault(str(p), Hidden(str(p), True))
        elif p.exists():
            out.setdefault(str(p), Hidden(str(p), False))
    dirs = [h.path for h in out.values() if h.is_dir]
    # What lies inside a hidden directory is hidden with it.
    return [h for h in out.values() if os.path.lexists(h.path)
            and not any(h.path.startswith(d.rstrip("/") + "/") for d in dirs)]


def check_bind(path: str, hidden: Iterable[Hidden]) -> str:
    """"" if path may be bound into a sandbox, else why not.

    The path must exist, be its own real path (a symlink could point a bind
    at a hidden directory), and neither be nor hold nor lie within a
    hidden path of the daemon's.
    """
    if not os.path.lexists(path):
        return f"{path} does not exist on this host"
    real = os.path.realpath(path)
    if real != path:
        return f"{path} is not its own real path (it resolves to {real}); bind {real}"
    for h in hidden:
        if path == h.path or path.startswith(h.path.rstrip("/") + "/") or (
                h.path.startswith(path.rstrip("/") + "/")):
            return f"{path} would show the daemon's {h.path}, which agents never see"
    return ""


def describe_failure(stderr: str) -> str:
    """A bwrap error line, with a hint for the usual cause."""
    line = stderr.strip().splitlines()[-1] if stderr.strip() else "bwrap failed"
    if "user namespace" in line.lower() or "No permissions to create" in line:
        return f"{line} (are unprivileged user namespaces allowed on this host?)"
    return line


def require() -> None:
    """Raise LaunchFailed unless agents can be sandboxed here."""
    problem = available()
    if problem:
        raise LaunchFailed(problem)
