"""The daemon's side of the guardian: start it, feed it heartbeats, import its reports.

The guardian (daemon/guardian.py) is a separate, minimal process that kills
every agent cgroup if the enforcement loop's heartbeats stop for longer than
its timeout, or the daemon dies. It cannot append to the audit log (it would
need the daemon's chain and lock), so it leaves a report file in the state
directory, and the daemon audits it at its next start (:func:`import_reports`).

Nothing here takes a lock: :meth:`Guardian.beat` is one non-blocking write(2)
and may be called from any thread, including the kill path's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

from daemon import children
from daemon.audit import AuditLog
from daemon.errors import GuardianError
from daemon.supervisor.pipes import read_until_eof

log = logging.getLogger(__name__)

GUARDIAN = Path(__file__).resolve().parent.parent / "guardian.py"
REPORT_GLOB = "guardian-report-*.json"
# What the guardian writes to its ready fd once armed (guardian.py).
ARMED = b"ARMED"
_READY_TIMEOUT_S = 10.0
_QUIT_TIMEOUT_S = 10.0
# Fields of a report that go into its audit record; anything else is dropped
# (the chain reserves some names, and the file is input, however trusted).
_REPORT_FIELDS = ("reason", "at", "daemon_pid", "guardian_pid", "timeout_s", "cgroups", "error")


class Guardian:
    """A running guardian process and the write end of its heartbeat pipe.

    Create with :meth:`start`. The write end is non-blocking and
    close-on-exec: agents never inherit it, so only the daemon's own death
    closes it (which the guardian reads as EOF).
    """

    def __init__(self, proc: subprocess.Popen[bytes], beat_fd: int) -> None:
        """Wrap a started guardian; use :meth:`start` instead."""
        self._proc = proc
        self._beat_fd = beat_fd
        self._quit_sent = False

    @classmethod
    def start(cls, *, cgroup_base: Path, report_dir: Path, timeout_s: float,
              force_fallback: bool = False) -> Self:
        """Spawn the guardian and wait until it is armed.

        *force_fallback* makes it kill as on a kernel without cgroup.kill
        (testing, like the daemon's own --force-kill-fallback). Raises
        GuardianError if it cannot be started or reports that it cannot arm
        within 10 s.
        """
        beat_r, beat_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        spec = {
            "heartbeat_fd": beat_r, "ready_fd": ready_w, "daemon_pid": os.getpid(),
            "cgroup_base": str(cgroup_base), "report_dir": str(report_dir),
            "timeout_s": float(timeout_s), "force_fallback": force_fallback,
        }
        try:
            # subprocess forks and execs in C (no preexec_fn), safe in the
            # threaded daemon; pass_fds makes just these two inheritable.
            proc = children.spawn(lambda: subprocess.Popen(
                [sys.executable, "-I", "-S", str(GUARDIAN), json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                pass_fds=(beat_r, ready_w),
                # Its own session: a terminal's ^C or a signal to the
                # daemon's process group never reaches it.
                start_new_session=True,
                env={},
                cwd="/",
            ))
        except OSError as err:
            for fd in (beat_r, beat_w, ready_r, ready_w):
                os.close(fd)
            raise GuardianError(f"cannot start the guardian: {err.strerror}") from err
        # Only the guardian may hold the read end: the daemon writes.
        os.close(beat_r)
        os.close(ready_w)
        os.set_blocking(beat_w, False)
        guardian = cls(proc, beat_w)
        try:
            message = _read_ready(ready_r, proc)
        finally:
            os.close(ready_r)
        if message is not None:
            guardian._abandon()
            raise GuardianError(f"the guardian did not arm: {message}")
        return guardian

    @property
    def pid(self) -> int:
        """The guardian's process id."""
        return self._proc.pid

    def beat(self) -> None:
        """Send one heartbeat. Never blocks, never raises for a full or broken pipe.

        A full pipe means beats are already pending; a broken one means the
        guardian has exited (see :meth:`status`).
        """
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._beat_fd, b".")

    def alive(self) -> bool:
        """Whether the guardian is still running (reaps it once it has exited)."""
        return self._proc.poll() is None

    def acted(self) -> bool:
        """Whether the guardian exited on its own, having killed every agent cgroup.

        Its report is audited at the daemon's next start. Useful to label
        agents that died meanwhile (end reason "guardian").
        """
        code = self._proc.poll()
        return code is not None and code in (0, 1) and not self._quit_sent

    def status(self) -> str:
        """``running (pid N)`` or ``exited (code N)``, for Info."""
        code = self._proc.poll()
        if code is None:
            return f"running (pid {self._proc.pid})"
        return f"exited (code {code})"

    def quit(self, timeout: float = _QUIT_TIMEOUT_S) -> None:
        """Tell the guardian the daemon has killed its agents itself; wait for it to exit.

        Call only after the agents are dead: the guardian exits without
        killing. If it does not exit within *timeout* it is SIGKILLed: a
        guardian left behind could act later on the agents of a new daemon
        with the same cgroup subtree.
        """
        if self._proc.poll() is None:
            # EPIPE: it exited meanwhile. EAGAIN: the pipe is full, so it is
            # not reading (stopped?); the bounded wait below ends that.
            self._quit_sent = True
            with contextlib.suppress(OSError):
                os.write(self._beat_fd, b"Q")
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("guardian pid %d did not exit within %.0f s of quit; killing it",
                            self._proc.pid, timeout)
                self._abandon()
        with contextlib.suppress(OSError):
            os.close(self._beat_fd)
        self._beat_fd = -1

    def _abandon(self) -> None:
        # Popen.kill signals by pid, which is safe here: the guardian is our
        # child and not yet reaped, so its pid cannot have been reused.
        with contextlib.suppress(OSError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=2.0)
        if self._beat_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._beat_fd)
            self._beat_fd = -1


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str | None:
    """None once the guardian says it is armed, else why it is not."""
    message = read_until_eof(fd, _READY_TIMEOUT_S)
    if message is None:
        return f"no word from the guardian within {_READY_TIMEOUT_S:.0f} s"
    if message == ARMED:
        return None
    if message:
        return message.decode("utf-8", "replace").strip()
    # EOF with nothing written: it died before arming (Python could not
    # even run it); its stderr, which is ours, says why.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    return f"it exited before arming (code {proc.returncode}); see the daemon's stderr"


def import_reports(report_dir: Path, audit: AuditLog) -> int:
    """Audit every guardian report in *report_dir*, oldest first, then delete it.

    Each becomes a ``guardian_killed`` record. A report that cannot be read or
    parsed becomes a ``guardian_report_unreadable`` record and is renamed to
    ``NAME.bad`` for a human. A crash between the append and the delete means
    the report is audited again at the next start (at least once, never
    lost). Returns how many reports were imported. Raises AuditWriteError if
    the audit log cannot be written (the report is then kept).
    """
    imported = 0
    for path in sorted(report_dir.glob(REPORT_GLOB)):
        try:
            report = _load_report(path)
        except (OSError, ValueError) as err:
            audit.append("guardian_report_unreadable", report=path.name, error=str(err))
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name + ".bad"))
            continue
        fields = {k: report[k] for k in _REPORT_FIELDS if k in report}
        audit.append("guardian_killed", report=path.name, **fields)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        imported += 1
        log.warning("the guardian killed %d agent cgroup(s) while the daemon was %s (%s)",
                    len(report.get("cgroups") or []),
                    "dead" if report.get("reason") == "daemon_died" else "unresponsive",
                    report.get("reason"))
    return imported


def _load_report(path: Path) -> dict[str, Any]:
    """Parse one report. Raises OSError or ValueError."""
    obj = json.loads(path.read_bytes())
    if not isinstance(obj, dict) or obj.get("event") != "guardian_killed":
        raise ValueError("not a guardian report")
    if not isinstance(obj.get("cgroups"), list) or not isinstance(obj.get("reason"), str):
        raise ValueError("guardian report lacks its reason or cgroups")
    return obj


__all__ = ["Guardian", "GuardianError", "import_reports"]
