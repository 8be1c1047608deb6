"""Guardian: kill every agent when the daemon dies or its enforcement loop stalls.

Run by the daemon as `python3 -I -S guardian.py SPEC_JSON`, never imported by
it (daemon/supervisor/guardian_link.py is the daemon's side). It is the
fail-closed layer for hosts without systemd, and a second layer with it: if
the daemon is SIGKILLed, crashes, or is alive but stalled (SIGSTOP, a
deadlock), nothing else would stop the agents.

SPEC_JSON holds:

- ``heartbeat_fd``: read end of a pipe the daemon's enforcement loop writes a
  byte to on every tick. Any bytes are a heartbeat; a ``Q`` byte means the
  daemon is shutting down cleanly and has killed its agents itself: exit 0
  without acting. EOF means every write end is closed: the daemon died.
- ``daemon_pid``: the daemon, our parent; watched through a pidfd too.
- ``cgroup_base``: the daemon's v2 subtree; every child directory is an agent.
- ``timeout_s``: act when no heartbeat came for this long (monotonic clock).
- ``report_dir``: where the report goes, for the daemon to audit at its next
  start (guardian-report-<unix ns>.json, mode 0600).
- ``ready_fd`` (optional): gets ``ARMED`` once the guardian watches, or one
  line saying why it cannot, then is closed (like shim.py's status pipe, but
  success is said out loud: EOF alone means Python died before our code ran).
- ``force_fallback`` (optional, testing): behave as on a kernel without
  cgroup.kill.

Acting: SIGKILL every agent cgroup (cgroup.kill, or the freeze / SIGKILL /
thaw loop before Linux 5.14), all of them before waiting on any, then wait
(bounded) for the kernel to report each empty, write the report, print one
line to stderr, exit 0. It never signals the daemon: under systemd the
watchdog deals with it; without systemd a stalled daemon stays for a human to
inspect, but its agents are dead. SIGTERM to the guardian makes it act too
(reason ``guardian_terminated``): stopping the guardian must not quietly
remove a safety layer.

Exit codes: 0 after a clean quit or after acting; 1 if the report could not
be written (the kills still happened); 2 for a bad spec.

To be hard to stall it imports only what it needs (no gRPC, no logging, no
daemon modules; -S skips site, -I ignores PYTHON* variables and the script's
directory), holds no locks, and does nothing but poll() until it acts.
"""

import errno
import json
import os
import select
import signal
import sys
import time

QUIT = b"Q"
ARMED = b"ARMED"  # written to ready_fd once armed (guardian_link reads it)
KILL_METHOD = "cgroup.kill"
FALLBACK_METHOD = "freeze-and-kill"
# How long, in all, to wait for the kernel to report the killed cgroups empty.
_VERIFY_S = 5.0
_FALLBACK_MAX_PASSES = 1000
_FREEZE_WAIT_S = 0.05
_READ_CHUNK = 65536

_terminated = False


class _SpecError(Exception):
    """The spec on the command line is unusable."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    # Only a flag: the wake-up fd (signal.set_wakeup_fd) makes poll() return,
    # and the loop acts outside the handler, never half-way through a kill.
    global _terminated  # noqa: PLW0603 - the one piece of state a handler may set
    _terminated = True


def _say(line: str) -> None:
    """One line on stderr; never let a closed or broken stderr stop us."""
    try:
        sys.stderr.write(f"agentd-guardian[{os.getpid()}]: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------ start-up
class _Spec:
    """The checked fields of SPEC_JSON."""

    def __init__(self, raw: dict[str, object]) -> None:
        self.heartbeat_fd = _int_field(raw, "heartbeat_fd")
        self.daemon_pid = _int_field(raw, "daemon_pid")
        self.cgroup_base = _str_field(raw, "cgroup_base")
        self.report_dir = _str_field(raw, "report_dir")
        timeout = raw.get("timeout_s")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
                0 < timeout < 1e9):
            raise _SpecError("spec field 'timeout_s' must be a positive number")
        self.timeout_s = float(timeout)
        ready = raw.get("ready_fd", -1)
        self.ready_fd = ready if isinstance(ready, int) and not isinstance(ready, bool) else -1
        self.force_fallback = raw.get("force_fallback") is True


def _int_field(raw: dict[str, object], key: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _SpecError(f"spec field {key!r} is missing or not an integer")
    return value


def _str_field(raw: dict[str, object], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise _SpecError(f"spec field {key!r} is missing or not a string")
    return value


def _parse(argv: list[str]) -> _Spec:
    """Read SPEC_JSON from argv. Raises _SpecError."""
    if len(argv) != 2:
        raise _SpecError("usage: guardian.py SPEC_JSON")
    try:
        raw = json.loads(argv[1])
    except ValueError as err:
        raise _SpecError(f"spec is not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise _SpecError("spec must be a JSON object")
    return _Spec(raw)


def _harden() -> None:
    """Keep the OOM killer and stray terminal signals away from the guardian."""
    # proc(5) /proc/PID/oom_score_adj: -1000 means this process is never
    # chosen by the OOM killer. Lowering it needs CAP_SYS_RESOURCE (root has it).
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"-1000")
        finally:
            os.close(fd)
    except OSError as err:
        _say(f"warning: cannot set oom_score_adj: {err.strerror}")
    # Python already ignores SIGPIPE; SIGINT and SIGHUP would otherwise end
    # us without acting (a terminal's ^C, a closed session).
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)


def _open_daemon_pidfd(daemon_pid: int) -> int:
    """A pidfd on the daemon, or -1 if the daemon is already gone.

    pidfd_open(2): the descriptor becomes readable when the process exits, and
    it pins the process, so a reused pid cannot fool it later. It could still
    name a stranger if the daemon died and its pid was reused before this
    call; but the daemon is our parent, and a parent that died is no longer
    returned by getppid(2) (we are reparented to a reaper), so checking
    getppid() *after* opening proves the pidfd is the daemon's.
    """
    try:
        pidfd = os.pidfd_open(daemon_pid)
    except ProcessLookupError:
        return -1
    if os.getppid() != daemon_pid:
        os.close(pidfd)
        return -1
    return pidfd


def _signal_ready(ready_fd: int, message: bytes) -> None:
    """Tell the daemon we are armed (ARMED) or why we are not, and close the fd."""
    if ready_fd < 0:
        return
    try:
        os.write(ready_fd, message[:4000])
        os.close(ready_fd)
    except OSError:
        pass


def _ready_fd_of(argv: list[str]) -> int:
    """ready_fd from a spec that failed its checks, to report why; -1 if none."""
    try:
        fd = json.loads(argv[1]).get("ready_fd", -1)
    except (IndexError, ValueError, AttributeError):
        return -1
    return fd if isinstance(fd, int) and not isinstance(fd, bool) else -1


# --------------------------------------------------------------------- watch
def _drain(fd: int) -> tuple[bytes, bool]:
    """Read everything pending on the non-blocking heartbeat fd: (data, eof)."""
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return b"".join(chunks), False
        except InterruptedError:
            continue
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def _watch(heartbeat_fd: int, pidfd: int, wake_fd: int, timeout_s: float) -> str | None:
    """Wait for a reason to act and return it; None for a clean quit."""
    poller = select.poll()
    poller.register(heartbeat_fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    while True:
        if _terminated:
            return "guardian_terminated"
        left = deadline - time.monotonic()
        if left <= 0:
            return "heartbeat_timeout"
        # poll(2) takes whole milliseconds: round up so we never wake early
        # and spin.
        events = poller.poll(int(left * 1000) + 1)
        ready = {fd for fd, _ in events}
        if heartbeat_fd in ready:
            # Read the pipe before looking at the pidfd: a daemon that wrote
            # Q and then exited shut down cleanly.
            data, eof = _drain(heartbeat_fd)
            if QUIT in data:
                return None
            if eof:
                return "daemon_died"
            if data:
                deadline = time.monotonic() + timeout_s
        if pidfd in ready:
            return "daemon_died"
        if wake_fd in ready:
            _drain(wake_fd)


# ----------------------------------------------------------------------- act
def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    """One write(2): cgroupfs acts on each write separately."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _pids(cgroup: str) -> list[int]:
    try:
        return [int(x) for x in _read(cgroup + "/cgroup.procs").split()]
    except FileNotFoundError:
        return []


def _children(base: str) -> list[str]:
    try:
        with os.scandir(base) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _populated(cgroup: str) -> bool:
    try:
        text = _read(cgroup + "/cgroup.events")
    except FileNotFoundError:
        # rmdir(2) of a cgroup succeeds only once it is empty: gone is empty.
        return False
    return "populated 1" in text.splitlines()


def _freeze(cgroup: str, frozen: bool) -> None:
    _write(cgroup + "/cgroup.freeze", b"1" if frozen else b"0")
    if not frozen:
        return
    # v2 freezing is asynchronous: wait briefly for "frozen 1" in
    # cgroup.events, never long (the kill pass goes ahead regardless).
    until = time.monotonic() + _FREEZE_WAIT_S
    while "frozen 1" not in _read(cgroup + "/cgroup.events").splitlines():
        if time.monotonic() >= until:
            return
        time.sleep(0.0005)


def _fallback_kill(cgroup: str, deadline: float) -> None:
    """Freeze / SIGKILL every member / thaw until a pass finds nobody (Linux < 5.14).

    The loop systemd (cg_kill_items) and snapd use. Bounded in passes and
    time: a task in uninterruptible sleep stays listed until it leaves it.
    """
    for _ in range(_FALLBACK_MAX_PASSES):
        _freeze(cgroup, True)
        try:
            members = _pids(cgroup)
            for pid in members:
                # The cgroup is frozen: no member can exit or fork, so a pid
                # read from cgroup.procs cannot be reused before this signal
                # lands. Frozen tasks still take SIGKILL on v2.
                try:  # noqa: SIM105 - contextlib would be one more import
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            _freeze(cgroup, False)
        if not members or time.monotonic() >= deadline:
            return


def _kill_all(base: str, force_fallback: bool) -> list[dict[str, object]]:
    """SIGKILL every agent cgroup under base, all before waiting on any."""
    names = _children(base)
    results: list[dict[str, object]] = []
    fallback: list[dict[str, object]] = []
    for name in names:
        cgroup = f"{base}/{name}"
        entry: dict[str, object] = {"name": name}
        try:
            entry["processes"] = len(_pids(cgroup))
        except (OSError, ValueError):
            entry["processes"] = -1
        try:
            if not force_fallback and os.path.exists(cgroup + "/cgroup.kill"):
                _write(cgroup + "/cgroup.kill", b"1")
                entry["method"] = KILL_METHOD
            else:
                entry["method"] = FALLBACK_METHOD
                # No new forks while the loop runs (pids.max exists only where
                # the v2 pids controller is enabled), and stop everyone now.
                if os.path.exists(cgroup + "/pids.max"):
                    _write(cgroup + "/pids.max", b"0")
                _write(cgroup + "/cgroup.freeze", b"1")
                fallback.append(entry)
        except OSError as err:
            entry["error"] = f"{err.strerror or err} ({errno.errorcode.get(err.errno or 0, '?')})"
        results.append(entry)
    deadline = time.monotonic() + _VERIFY_S
    for entry in fallback:
        try:
            _fallback_kill(f"{base}/{entry['name']}", deadline)
        except OSError as err:
            if os.path.exists(f"{base}/{entry['name']}"):
                entry["error"] = f"{err.strerror or err}"
    for entry in results:
        entry["verified_empty"] = _wait_empty(f"{base}/{entry['name']}", deadline)
    return results


def _wait_empty(cgroup: str, deadline: float) -> bool:
    """Poll cgroup.events until populated 0 or the monotonic deadline.

    Polls rather than waiting for the file's notification: the kernel
    rate-limits those to about one per 10 ms (FIELD-NOTES). The backoff starts
    at 20 us and doubles to 1 ms.
    """
    delay = 20e-6
    while True:
        try:
            if not _populated(cgroup):
                return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)


def _write_report(report_dir: str, report: dict[str, object]) -> str:
    """Write the report durably (_replace) as guardian-report-<unix ns>.json."""
    data = json.dumps(report, sort_keys=True).encode("ascii") + b"\n"
    final = os.path.join(report_dir, f"guardian-report-{time.time_ns()}.json")
    _replace(final, data)
    return final


# A private copy of daemon/durable.py's replace(), _tmp_name() and
# fsync_dir(): the guardian imports no daemon module (see the docstring).
# Keep the two in step; tests/unit/test_durable.py runs both through the
# same tests.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _replace(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: unpredictable tmp, fsync, rename, fsync dir. Raises OSError."""
    tmp = _tmp_name(path)
    # O_EXCL | O_NOFOLLOW: a planted symlink or hard link must not redirect root's write.
    fd = os.open(tmp, _CREATE, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:  # noqa: SIM105 - not contextlib: one more import to load (see the docstring)
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def _tmp_name(path: str) -> str:
    # Hidden, so guardian_link's guardian-report-*.json glob never takes it.
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{os.urandom(8).hex()}.tmp")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _act(spec: _Spec, reason: str) -> int:
    """Kill, verify, report. Returns the exit code."""
    at = time.time()
    base = spec.cgroup_base
    try:
        cgroups = _kill_all(base, spec.force_fallback)
        problem = ""
    except OSError as err:
        # Cannot even list the subtree (a missing one is simply empty).
        cgroups, problem = [], f"cannot list {base}: {err.strerror or err}"
    report: dict[str, object] = {
        "event": "guardian_killed", "reason": reason, "at": at,
        "daemon_pid": spec.daemon_pid, "guardian_pid": os.getpid(),
        "timeout_s": spec.timeout_s, "cgroups": cgroups,
    }
    if problem:
        report["error"] = problem
    killed = sum(1 for c in cgroups if "error" not in c)
    empty = all(c.get("verified_empty") for c in cgroups) and not problem
    summary = f"{reason}: killed {killed} agent cgroup(s) under {base} (all empty: {empty})"
    try:
        path = _write_report(spec.report_dir, report)
    except OSError as err:
        _say(f"{summary}; CANNOT WRITE REPORT: {err}; report was {json.dumps(report)}")
        return 1
    _say(f"{summary}; report {path}")
    return 0


def main() -> int:
    """Arm, watch, act at most once; returns the exit code."""
    try:
        spec = _parse(sys.argv)
    except _SpecError as err:
        _signal_ready(_ready_fd_of(sys.argv), f"bad spec: {err}".encode())
        _say(f"error: {err}")
        return 2
    try:
        # SIGTERM: a handler that only sets a flag, plus a wake-up fd so
        # poll() returns at once (PEP 475 would otherwise resume it).
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _harden()
        os.set_blocking(spec.heartbeat_fd, False)
        pidfd = _open_daemon_pidfd(spec.daemon_pid)
    except OSError as err:
        _signal_ready(spec.ready_fd, f"cannot arm: {err}".encode("utf-8", "replace"))
        _say(f"error: cannot arm: {err}")
        return 2
    _signal_ready(spec.ready_fd, ARMED)
    reason: str | None = "daemon_died"
    if pidfd >= 0:
        try:
            reason = _watch(spec.heartbeat_fd, pidfd, wake_r, spec.timeout_s)
        except Exception as err:
            # Fail closed: a guardian that can no longer watch must not
            # leave the agents unguarded.
            _say(f"error while watching: {err!r}")
            reason = "guardian_error"
    if reason is None:
        return 0
    return _act(spec, reason)


if __name__ == "__main__":
    sys.exit(main())
