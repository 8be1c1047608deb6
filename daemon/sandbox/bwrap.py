"""The bubblewrap command line that puts one agent in its sandbox (bwrap(1)).

bwrap runs unprivileged: the shim, still root, joins the agent's cgroups,
drops to the agent's uid, gid and groups, sets no_new_privs, and only then
execs bwrap. bwrap then creates a user namespace owned by the agent's uid
(user_namespaces(7)), and the other namespaces and mounts inside it, with
capabilities that count only there. Run as root with --unshare-user --uid N
instead, the sandbox's uid N would map to the caller outside: real root.

What the agent gets (docs/sandbox.md) is its *view*, a list of Mounts built
by view() and checked from outside by daemon.sandbox.verify:
- what programs need to run, read-only: /usr (with the /bin, /lib*, /sbin
  links or directories) and /etc, minus the secrets and host identity listed
  in ETC_SECRETS; nothing else of the host (no /home, /root, /srv, /opt,
  /var, /mnt, /media, /boot, /sys) unless the profile binds it;
- private /proc (its own PID namespace: it sees and signals only its own
  processes), a minimal read-only /dev with a capped /dev/shm, an empty
  read-only /run, a read-only root;
- /scratch, a tmpfs capped at the profile's scratch size, /tmp inside it, and
  a private capped /var/tmp; both vanish with the agent's mount namespace, so
  nothing carries over;
- the profile's bind_ro and bind_rw at the same paths;
- the daemon's own files hidden under empty read-only tmpfs mounts;
- no network but loopback (network = "none"), its own IPC, UTS and cgroup
  namespaces, a new session (no TIOCSTI into a terminal), no capabilities;
- the daemon's seccomp filter, loaded by bwrap right before it execs the agent.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from daemon.errors import LaunchFailed
from daemon.sandbox.policy import Profile

BWRAP = "/usr/bin/bwrap"
SCRATCH = "/scratch"
TMP = "/tmp"
# Top-level host entries shown read-only: what programs need to start. On a
# merged-/usr host /bin, /lib* and /sbin are symlinks into /usr and stay
# symlinks; elsewhere they are directories and are bound like /usr.
SYSTEM = ("bin", "etc", "lib", "lib32", "lib64", "libx32", "sbin", "usr")
# The sandbox's own places: a bind may not land on or under them (they are
# private mounts, and /tmp is a symlink into /scratch).
OWN = ("/proc", "/dev", "/scratch", "/tmp")
# Paths under /etc that carry secrets, or identify the host, and that no
# program needs to run (globs; each is masked where it exists: a file under
# /dev/null, a directory under an empty read-only tmpfs). Most are readable
# by root alone already: masked anyway, so that a group grant, a named agent
# user in a privileged group, or a mode mistake does not hand them out.
ETC_SECRETS: tuple[tuple[str, str], ...] = (
    ("/etc/shadow", "password hashes"),
    ("/etc/shadow-", "password hashes, a backup"),
    ("/etc/gshadow", "group password hashes"),
    ("/etc/gshadow-", "group password hashes, a backup"),
    ("/etc/security/opasswd", "old password hashes"),
    ("/etc/sudoers", "who may become root, and how"),
    ("/etc/sudoers.d", "who may become root, and how"),
    ("/etc/ssh/ssh_host_*", "the host's SSH keys: the private ones impersonate it, the "
                            "public ones identify it"),
    ("/etc/ssl/private", "TLS private keys"),
    ("/etc/letsencrypt", "TLS private keys"),
    ("/etc/krb5.keytab", "Kerberos host keys"),
    ("/etc/NetworkManager/system-connections", "Wi-Fi and VPN passwords"),
    ("/etc/wpa_supplicant", "Wi-Fi passwords"),
    ("/etc/netplan", "Wi-Fi passwords"),
    ("/etc/wireguard", "VPN private keys"),
    ("/etc/ipsec.secrets", "VPN secrets"),
    ("/etc/ppp/chap-secrets", "PPP passwords"),
    ("/etc/ppp/pap-secrets", "PPP passwords"),
    ("/etc/machine-id", "the host's stable identity"),
    ("/etc/hostname", "the host's name"),
    ("/etc/agentd", "the daemon's configuration, keys and policies"),
)
# What the test-only config knob sandbox_test_omit may leave out: "view"
# leaves out the view's limit (the whole host is bound read-only, as before
# issue 11), "masks" the masks over secrets and the daemon's files.
OMITTABLE = ("seccomp", "network", "pid", "view", "masks")

Kind = Literal["root", "bind", "symlink", "proc", "dev", "tmpfs", "mask", "hide"]


@dataclass(frozen=True)
class Hidden:
    """A path no agent may see: an empty tmpfs over a directory, /dev/null over a file."""

    path: str
    is_dir: bool


@dataclass(frozen=True)
class Mount:
    """One entry of an agent's filesystem view, at path in its mount namespace.

    kind says what is there: "bind" (source is the host path), "symlink"
    (source is its target), "proc", "dev" (bwrap's minimal /dev), "tmpfs"
    (private, empty at start), "mask" (a file under /dev/null), "hide" (a
    directory under an empty read-only tmpfs), "root" (bwrap's own root).
    """

    path: str
    kind: Kind
    source: str
    writable: bool = False
    why: str = ""  # for a mask or hide: what it keeps from the agent

    @property
    def is_mount(self) -> bool:
        """Whether /proc/PID/mountinfo shows it (a symlink is a file on the root)."""
        return self.kind != "symlink"


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


def _system_view(root: str = "/") -> list[Mount]:
    """The read-only system part of the view: SYSTEM's entries that exist under root."""
    out = []
    for name in SYSTEM:
        path = os.path.join(root, name)
        dest = "/" + name
        if os.path.islink(path):
            # Merged /usr: /bin -> usr/bin and the like stay symlinks.
            out.append(Mount(dest, "symlink", os.readlink(path)))
        elif os.path.isdir(path):
            out.append(Mount(dest, "bind", path))
    return out


def secrets(root: str = "/") -> list[Hidden]:
    """ETC_SECRETS that exist under root, symlinks resolved (a masked link would mask its
    target only where the link lies: the target is masked instead, if the view shows it)."""
    out: dict[str, Hidden] = {}
    for pattern, _why in ETC_SECRETS:
        for found in sorted(glob.glob(os.path.join(root, pattern.lstrip("/")))):
            real = os.path.realpath(found)
            rel = "/" + os.path.relpath(real, root)
            if not in_system(rel):
                continue  # a link out of the view: what it names is not shown
            out.setdefault(rel, Hidden(rel, os.path.isdir(real)))
    return list(out.values())


def _why(path: str) -> str:
    for pattern, why in ETC_SECRETS:
        if fnmatch.fnmatch(path, pattern):
            return why
    return "the daemon's own"


def in_system(path: str) -> bool:
    """Whether path lies in the system part of the view (/usr, /etc, ...)."""
    top = path.strip("/").split("/", 1)[0]
    return top in SYSTEM


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


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


def view(profile: Profile, *, hidden: Iterable[Hidden], uid: int, gids: Iterable[int] = (),
         root: str = "/") -> list[Mount]:
    """The agent's filesystem view, in the order bwrap makes it.

    hidden: the daemon's own files (hidden_paths); the /etc secrets are
    added here. Both are masked last, so that no bind shows them again, and
    only where the view shows them and bwrap (as the agent) can look them up.
    """
    n = profile.scratch_bytes
    size = f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"
    out = [Mount("/", "root", "bwrap's tmpfs, read-only")]
    out += _system_view(root)
    # Every writable place is a tmpfs capped at the scratch size, and its
    # pages count against the agent's memory cgroup: bwrap's own root and
    # --dev would otherwise be tmpfs mounts of half the host's RAM each.
    out += [Mount("/proc", "proc", "proc of its own PID namespace", writable=True),
            Mount("/dev", "dev", "bwrap's minimal /dev"),
            Mount("/dev/shm", "tmpfs", f"private tmpfs, {size}", writable=True),
            Mount("/run", "tmpfs", "private tmpfs, empty"),
            Mount(SCRATCH, "tmpfs", f"private tmpfs, {size}", writable=True),
            Mount(TMP, "symlink", SCRATCH + TMP),
            # The other world-writable host directory: private like /tmp, so
            # nothing the host or another agent leaves there is seen or reached.
            Mount("/var/tmp", "tmpfs", f"private tmpfs, {size}", writable=True)]
    out += [Mount(p, "bind", p) for p in profile.bind_ro]
    out += [Mount(p, "bind", p, writable=True) for p in profile.bind_rw]
    binds = (*profile.bind_ro, *profile.bind_rw)
    gids = tuple(gids)
    masked: set[str] = set()
    for h in (*secrets(root), *hidden):
        shown = in_system(h.path) or any(_under(h.path, b) for b in binds)
        if h.path in masked or not shown or not reachable(os.path.join(root, h.path.lstrip("/")),
                                                          uid, gids):
            continue
        masked.add(h.path)
        if h.is_dir:
            out.append(Mount(h.path, "hide", "empty tmpfs, read-only", why=_why(h.path)))
        else:
            out.append(Mount(h.path, "mask", "/dev/null", why=_why(h.path)))
    return out


def _mount_args(mounts: Sequence[Mount], scratch_bytes: int) -> list[str]:
    size = str(scratch_bytes)
    a: list[str] = []
    for m in mounts:
        if m.kind == "root":
            continue
        if m.kind == "symlink":
            if m.path == TMP:
                a += ["--dir", SCRATCH + TMP]
            a += ["--symlink", m.source, m.path]
        elif m.kind == "bind":
            a += ["--bind" if m.writable else "--ro-bind", m.source, m.path]
        elif m.kind == "proc":
            a += ["--proc", m.path]
        elif m.kind == "dev":
            a += ["--dev", m.path]
        elif m.kind == "tmpfs":
            a += ["--size", size, "--tmpfs", m.path] if m.writable else ["--tmpfs", m.path]
        elif m.kind == "hide":
            a += ["--tmpfs", m.path, "--remount-ro", m.path]
        elif m.kind == "mask":
            a += ["--ro-bind", "/dev/null", m.path]
    return a


def _whole_host() -> list[str]:
    """--ro-bind for each top-level host directory the view leaves out (testing only)."""
    skip = {*SYSTEM, "proc", "dev", "tmp", "run", "scratch", "sys", "lost+found"}
    with os.scandir("/") as it:
        return [a for e in sorted(it, key=lambda e: e.name)
                if e.name not in skip and e.is_dir(follow_symlinks=False)
                for a in ("--ro-bind", e.path, e.path)]


def argv(
    profile: Profile,
    command: Sequence[str],
    *,
    seccomp_fd: int,
    hidden: Iterable[Hidden] = (),
    uid: int,
    gids: Iterable[int] = (),
    omit: str = "",
    mounts: Sequence[Mount] | None = None,
) -> list[str]:
    """The full argv: bwrap, its options, "--", then the agent's command.

    mounts: the view (view()); computed here when not given. omit (testing
    only, from sandbox_test_omit) leaves one restriction out so that the
    checks from outside can be shown to catch it.
    """
    if mounts is None:
        mounts = view(profile, hidden=hidden, uid=uid, gids=gids)
    # No --hostname: under systemd's ProtectHostname= (agentd.service)
    # sethostname(2) is refused even inside a new UTS namespace.
    a = [BWRAP, "--unshare-user", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if omit != "pid":
        a.append("--unshare-pid")
    if profile.network == "none" and omit != "network":
        # A new network namespace: bwrap brings its loopback up, nothing else.
        a.append("--unshare-net")
    # network = "allowlist": the shim has already entered the namespace the
    # daemon made (daemon/egress/netns.py); bwrap keeps it.
    # Not --disable-userns: it writes /proc/sys/user/max_user_namespaces,
    # which systemd's ProtectKernelTunables= (agentd.service) makes read-only.
    # The seccomp filter refuses new user namespaces instead.
    # No --die-with-parent: it is PR_SET_PDEATHSIG, which fires when the
    # parent *thread* exits (prctl(2)), here whichever daemon thread spawned
    # the shim. The daemon watches bwrap's outer process instead, and kills
    # the whole cgroup when it exits. --new-session: no TIOCSTI into a
    # terminal the agent was started from (CVE-2017-5226).
    a += ["--new-session", "--cap-drop", "ALL"]
    if omit == "view":
        a += _whole_host()
    if omit == "masks":
        mounts = [m for m in mounts if m.kind not in ("mask", "hide")]
    a += _mount_args(mounts, profile.scratch_bytes)
    # After the binds: a bind below /run needs its mount point made first.
    # --remount-ro is not recursive: the scratch, /var/tmp and /dev/shm
    # mounts stay writable, and a bind below /run keeps its own mode; bwrap's
    # root and /dev (where a file could otherwise be made anywhere) become
    # read-only.
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
    at a hidden directory), neither be nor hold nor lie within a hidden path
    of the daemon's, nor be or lie within an /etc secret (masked over any
    bind), nor land on the sandbox's own places (OWN) or be / itself.
    """
    if path == "/":
        return "the whole host is never an agent's view; bind the directories it needs"
    for own in OWN:
        if _under(path, own):
            return f"{own} is the sandbox's own (private in every sandbox); bind elsewhere"
    if not os.path.lexists(path):
        return f"{path} does not exist on this host"
    real = os.path.realpath(path)
    if real != path:
        return f"{path} is not its own real path (it resolves to {real}); bind {real}"
    for h in hidden:
        if _under(path, h.path) or h.path.startswith(path.rstrip("/") + "/"):
            return f"{path} would show the daemon's {h.path}, which agents never see"
    for s in secrets():
        if _under(path, s.path):
            return f"{path} carries secrets ({_why(s.path)}), which agents never see"
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
