"""Exec shim: join the agent's cgroups, drop to the agent's user, exec the agent.

Run by the daemon as `python3 -I -S shim.py STATUS_FD SPEC`, never
imported; SPEC is a dict in the marshal module's format, hex-encoded (the
daemon's own interpreter writes it and runs this one, so the format
matches). It exists because preexec_fn is unsafe in the threaded daemon
(subprocess docs; FIELD-NOTES), and because the agent's first process must be
inside its cgroups before any agent code runs, so no fork can escape during
start-up.

Contract: on success the exec closes STATUS_FD (it is close-on-exec) and the
daemon reads EOF; on failure the shim writes one line saying what failed to
STATUS_FD and exits 127 — the runc "sync pipe" pattern. It imports only the
standard library, and as little of it as it can: -S skips site, -I ignores
PYTHON* variables and the user's site directory.
"""

# Start-up is most of this program's cost and sits before every agent's
# first instruction: marshal (built in) rather than json, and _signal (the C
# module signal wraps) rather than signal, spare json's and enum's imports,
# about 7 ms a launch.
import _signal as signal  # type: ignore[import-not-found]  # no stub: the C module
import ctypes
import marshal
import os
import resource
import sys

# prctl(2) constants; ctypes is loaded while still root, before the user
# drop (afterwards the interpreter's files may no longer be readable).
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_CLONE_NEWNET = 0x40000000  # sched.h


def _fail(status_fd: int, what: str, err: BaseException) -> None:
    msg = f"{what}: {err.strerror if isinstance(err, OSError) else err}"
    try:
        os.write(status_fd, msg.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(127)


def main() -> None:
    status_fd = int(sys.argv[1])
    # Written by the daemon, this process's parent, into its argv: nothing
    # else can put bytes there.
    spec = marshal.loads(bytes.fromhex(sys.argv[2]))  # noqa: S302
    os.set_inheritable(status_fd, False)

    step = "join cgroup"
    try:
        for procs in spec["cgroups"]:
            step = f"join cgroup {procs}"
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

        # An allowlist agent's network namespace, made by the daemon: entered
        # while still root (setns(2) needs CAP_SYS_ADMIN), before bwrap,
        # which is then given no --unshare-net (daemon/egress/netns.py).
        netns = spec.get("netns_fd")
        if netns is not None:
            step = "enter the agent's network namespace"
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(netns, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")
            os.close(netns)

        # Order matters: groups and gid while still root, uid last
        # (setuid(2) drops the right to change the others).
        step = "set supplementary groups"
        os.setgroups(spec["groups"])
        step = "set gid"
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        step = "set uid"
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        if spec["uid"] != 0 and (os.getuid() == 0 or os.geteuid() == 0):
            raise OSError(1, "still root after setresuid")

        # no_new_privs before the exec: nothing the agent (or bwrap) execs
        # can gain privileges, setuid bits and file capabilities included.
        if spec.get("no_new_privs"):
            step = "set no_new_privs"
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
                    _PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")

        # The daemon raised its own limit to watch many agents; agents get
        # the configured one, soft and hard alike, so they cannot raise it.
        step = "set RLIMIT_NOFILE"
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec["nofile"], spec["nofile"]))

        step = f"chdir {spec['cwd']}"
        os.chdir(spec["cwd"])

        # The Python runtime ignores SIGPIPE and SIGXFSZ, and ignored
        # dispositions survive execve(2): restore the defaults the agent
        # would get from any other launcher. Unblock every signal too.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

        # Defence in depth: nothing of the daemon's but 0-2 reaches the agent,
        # and the descriptors the spec hands to bwrap (its seccomp filter, its
        # status pipe), which bwrap closes before it execs the agent.
        keep = sorted({status_fd, *spec.get("keep_fds", [])})
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
        for fd in spec.get("keep_fds", []):
            os.set_inheritable(fd, True)

        step = f"exec {spec['argv'][0]}"
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])  # noqa: S606 - no shell, by design
    except (OSError, KeyError, ValueError, TypeError) as err:
        _fail(status_fd, step, err)


if __name__ == "__main__":
    main()
