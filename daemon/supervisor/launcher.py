"""Start an agent's first process inside its cgroups, through the exec shim."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from daemon import children
from daemon.cgroups.tree import AgentCgroup
from daemon.errors import LaunchFailed
from daemon.supervisor.pipes import read_until_eof
from daemon.users import AgentUser

SHIM = Path(__file__).resolve().parent.parent / "shim.py"
_SHIM_TIMEOUT_S = 10.0


@dataclass
class Spawned:
    proc: subprocess.Popen[bytes]
    stdout_fd: int  # read ends, for the reactor
    stderr_fd: int


def spawn(
    *,
    cgroup: AgentCgroup,
    argv: list[str],
    user: AgentUser,
    env: dict[str, str],
    nofile: int,
    cwd: str = "/",
    keep_fds: tuple[int, ...] = (),
    no_new_privs: bool = False,
    netns_fd: int | None = None,
) -> Spawned:
    """Spawn argv as user inside cgroup. Raises LaunchFailed with the shim's reason.

    subprocess forks and execs in C with no Python code in the child
    (no preexec_fn), so this is safe in the threaded daemon. The shim then
    joins the cgroups, drops privileges and execs; it reports failure
    through a close-on-exec pipe, so EOF with no message means the agent's
    program is running. keep_fds reach the exec'd program (bwrap's seccomp
    filter and status pipe); no_new_privs sets PR_SET_NO_NEW_PRIVS first;
    netns_fd is a network namespace the shim enters (and closes) before all that.
    """
    spec = {
        "cgroups": cgroup.procs_files(),
        "uid": user.uid,
        "gid": user.gid,
        "groups": list(user.groups),
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "nofile": nofile,
        "keep_fds": list(keep_fds),
        "no_new_privs": no_new_privs,
        "netns_fd": netns_fd,
    }
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = children.spawn(lambda: subprocess.Popen(
            [sys.executable, "-I", "-S", str(SHIM), str(status_w), marshal.dumps(spec).hex()],
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            close_fds=True,
            pass_fds=(status_w, *keep_fds, *(() if netns_fd is None else (netns_fd,))),
            # Its own session: signals aimed at the daemon's terminal or
            # process group never reach the agent by accident.
            start_new_session=True,
            env={},
            cwd="/",
        ))
    except OSError as err:
        for fd in (status_r, status_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise LaunchFailed(f"cannot start the launch shim: {err.strerror}") from err
    for fd in (status_w, out_w, err_w):
        os.close(fd)
    try:
        message = _read_status(status_r)
    finally:
        os.close(status_r)
    if message is not None:
        proc.wait()
        os.close(out_r)
        os.close(err_r)
        raise LaunchFailed(f"agent did not start: {message}")
    return Spawned(proc=proc, stdout_fd=out_r, stderr_fd=err_r)


def _read_status(fd: int) -> str | None:
    """None on EOF with no data (exec succeeded), else the shim's message."""
    data = read_until_eof(fd, _SHIM_TIMEOUT_S)
    if data is None:
        return "the launch shim did not exec within 10 s"
    return data.decode("utf-8", "replace").strip() or None


def proc_start_time(pid: int) -> float:
    """Wall-clock start time of pid, from /proc/PID/stat and /proc/stat btime.

    Falls back to now if the process is already gone.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()
