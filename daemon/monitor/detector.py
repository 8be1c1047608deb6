"""The daemon's side of an out-of-process detector: JSON lines over its stdin and stdout.

A detector is a heavier judge of agent output than the rules (for example
similarity to known coercive text) that runs as its own unprivileged process.
The daemon starts it (``detector_command``, as ``detector_user``), restarts
it with a backoff when it exits, and speaks the protocol in docs/detectors.md:

    daemon -> detector  {"agent": NAME, "agent_id": ID, "stream": "stdout",
                         "seq": N, "text": "..."}
    detector -> daemon  {"agent_id": ID, "seq": N, "verdict": "ok|alert|freeze|kill",
                         "score": 0.93, "reason": "..."}

It is trusted less than the daemon, so nothing it does may hurt the daemon:

* submit() (the reactor thread) only appends to a bounded outbox and never
  blocks; when the detector falls behind, the oldest batches are dropped and
  counted, and the per-agent seq numbers show it the gaps;
* its lines are read with a length limit, parsed strictly, and read no
  faster than _MAX_LINES_PER_S (a flood slows the detector, not the daemon);
* what it may order is capped by the caller (``detector_max_action``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shlex
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, cast

from daemon import children
from daemon.monitor.rules import SEVERITY

if TYPE_CHECKING:
    from daemon.supervisor.agent import Agent
    from daemon.users import AgentUser

log = logging.getLogger(__name__)

VERDICTS = ("ok", "alert", "freeze", "kill")
MAX_LINE = 4096  # bytes; a longer verdict line is garbage
MAX_REASON = 200  # characters of a reason kept for the audit log
BATCH_BYTES = 16384  # output of one agent stream gathered into one message
MAX_PENDING_BYTES = 1 << 20  # outbox bound; the oldest batches go first
_MAX_LINES_PER_S = 1000
_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
_HEALTHY_AFTER_S = 60.0  # a detector that ran this long restarts without delay
_STOP_WAIT_S = 2.0

OnVerdict = Callable[["Agent", "Verdict"], None]
OnEvent = Callable[[str, Mapping[str, object]], None]


@dataclass(frozen=True)
class Verdict:
    """One verdict line from the detector, checked."""

    agent_id: str
    seq: int
    verdict: str  # ok | alert | freeze | kill
    score: float
    reason: str


def parse_verdict(line: bytes) -> Verdict:
    """Parse and check one line. Raises ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    agent_id, seq, verdict = obj.get("agent_id"), obj.get("seq", 0), obj.get("verdict")
    score, reason = obj.get("score", 0.0), obj.get("reason", "")
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError("agent_id must be a non-empty string")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("seq must be a non-negative integer")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
    if (not isinstance(score, int | float) or isinstance(score, bool)
            or not math.isfinite(score)):
        raise ValueError("score must be a finite number")
    if not isinstance(reason, str):
        raise ValueError("reason must be a string")
    return Verdict(agent_id=agent_id, seq=seq, verdict=verdict, score=float(score),
                   reason=reason[:MAX_REASON])


def cap(verdict: str, max_action: str) -> str:
    """The verdict, or max_action if the verdict orders more than that."""
    return verdict if SEVERITY[verdict] <= SEVERITY[max_action] else max_action


@dataclass
class DetectorStats:
    """Counters, for the status and metrics; approximate under concurrency."""

    running: bool = False
    pid: int = 0
    starts: int = 0
    sent_batches: int = 0
    sent_bytes: int = 0
    dropped_batches: int = 0
    dropped_bytes: int = 0
    verdicts: int = 0
    bad_lines: int = 0
    unknown_agents: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(eq=False)
class _Batch:
    agent: Agent
    stream: str
    seq: int
    parts: list[bytes]
    size: int = 0


class DetectorLink:
    """Starts and feeds one detector process, and reads its verdicts.

    argv is the command (a string is split like a shell would, without one);
    user is who it runs as (None: the daemon's own user, for tests without
    root). on_verdict(agent, verdict) is called on the reader thread for each
    verdict that is not "ok" and names a known agent; on_event(event, fields)
    for starts and exits (the caller audits them).
    """

    def __init__(self, argv: str | list[str], *, user: AgentUser | None,
                 on_verdict: OnVerdict, on_event: OnEvent,
                 batch_bytes: int = BATCH_BYTES,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        self.user = user
        self._on_verdict = on_verdict
        self._on_event = on_event
        self.batch_bytes = batch_bytes
        self.max_pending_bytes = max_pending_bytes
        self.stats = DetectorStats()
        self._cond = threading.Condition()
        self._queue: deque[_Batch] = deque()
        self._open: dict[tuple[int, str], _Batch] = {}  # (id(agent), stream) -> newest batch
        self._pending = 0
        self._seq: weakref.WeakKeyDictionary[Agent, int] = weakref.WeakKeyDictionary()
        self._by_id: weakref.WeakValueDictionary[str, Agent] = weakref.WeakValueDictionary()
        self._proc: subprocess.Popen[bytes] | None = None
        # Held while writing to, or closing, the detector's stdin: a file
        # descriptor closed under a blocked write could be reused by the time
        # the write resumes. Only the writer waits on it for long.
        self._stdin_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._supervise, name="agentd-detector", daemon=True),
            threading.Thread(target=self._write_loop, name="agentd-detector-out", daemon=True),
        ]
        self._last_complaint = 0.0

    # ------------------------------------------------------------ control
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Close its stdin (the protocol's "exit now"), then kill it if it lingers."""
        self._stopping.set()
        with self._cond:
            proc = self._proc
            self._cond.notify_all()
        # The writer closes its stdin on seeing _stopping (if it is stuck in a
        # write to a detector that stopped reading, the kill below frees it).
        if proc is not None:
            try:
                proc.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=_STOP_WAIT_S + 1)

    # -------------------------------------------------- the reactor's side
    def submit(self, agent: Agent, stream: str, data: bytes) -> None:
        """Queue one write of agent's output. Never blocks; drops the oldest when full."""
        key = (id(agent), stream)
        with self._cond:
            batch = self._open.get(key)
            if batch is None or batch.size >= self.batch_bytes:
                seq = self._seq.get(agent, 0) + 1
                self._seq[agent] = seq
                self._by_id[agent.id] = agent
                batch = _Batch(agent, stream, seq, [])
                self._queue.append(batch)
                self._open[key] = batch
            batch.parts.append(data)
            batch.size += len(data)
            self._pending += len(data)
            while self._pending > self.max_pending_bytes and len(self._queue) > 1:
                old = self._take()
                self.stats.dropped_batches += 1
                self.stats.dropped_bytes += old.size
            self._cond.notify()

    def _take(self) -> _Batch:
        """Pop the oldest batch (the caller holds the lock)."""
        batch = self._queue.popleft()
        key = (id(batch.agent), batch.stream)
        if self._open.get(key) is batch:
            del self._open[key]
        self._pending -= batch.size
        return batch

    # ------------------------------------------------------------ writer
    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping.is_set() and (not self._queue or self._proc is None):
                    self._cond.wait()
                proc = self._proc
                if self._stopping.is_set():
                    if proc is not None:
                        with self._stdin_lock:
                            _close(proc.stdin)
                    return
                batch = self._take()
            assert proc is not None
            data = b"".join(batch.parts)
            line = json.dumps({
                "agent": batch.agent.name, "agent_id": batch.agent.id, "stream": batch.stream,
                "seq": batch.seq, "text": data.decode("utf-8", errors="replace"),
            }).encode() + b"\n"
            try:
                # Blocks while the detector is busy: only this thread waits.
                with self._stdin_lock:
                    _write_all(proc.stdin, line)
            except (OSError, ValueError):
                # It died (EPIPE) or is being replaced; the supervisor thread
                # notices on its stdout. This batch is lost.
                self.stats.dropped_batches += 1
                self.stats.dropped_bytes += batch.size
                with self._cond:
                    if self._proc is proc:
                        self._cond.wait(0.1)
                continue
            self.stats.sent_batches += 1
            self.stats.sent_bytes += batch.size

    # -------------------------------------------------- supervisor/reader
    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as err:
                failures += 1
                delay = _BACKOFF_S[min(failures, len(_BACKOFF_S)) - 1]
                self._on_event("detector_failed", {"argv": self.argv, "error": str(err),
                                                   "restart_in_s": delay})
                self._stopping.wait(delay)
                continue
            with self._cond:
                self._proc = proc
                self.stats.running, self.stats.pid = True, proc.pid
                self.stats.starts += 1
                self._cond.notify_all()
            self._on_event("detector_started", {"argv": self.argv, "pid": proc.pid,
                                                "user": self.user.name if self.user else ""})
            assert proc.stdout is not None
            reader = io.BufferedReader(cast(io.RawIOBase, proc.stdout), 65536)
            try:
                self._read(reader)
            except Exception:
                log.exception("reading the detector's verdicts")
            # EOF on its stdout: it exited, or closed it and is of no more use.
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
            with self._stdin_lock:
                _close(proc.stdin)
            _close(reader)
            with self._cond:
                self._proc = None
                self.stats.running = False
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started > _HEALTHY_AFTER_S else failures + 1
            delay = _BACKOFF_S[min(max(failures, 1), len(_BACKOFF_S)) - 1]
            self._on_event("detector_exited", {"pid": proc.pid, "returncode": rc,
                                               "restart_in_s": delay})
            self._stopping.wait(delay)

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start the detector: its own session, a bare environment, root's files closed."""
        kw: dict[str, object] = {}
        if self.user is not None:
            kw = {"user": self.user.uid, "group": self.user.gid,
                  "extra_groups": list(self.user.groups)}
        # Unbuffered: stdin is written in whole lines under _stdin_lock, and a
        # buffered writer's own lock would make closing it wait on a blocked write.
        return children.spawn(lambda: subprocess.Popen(  # type: ignore[call-overload]
            self.argv, bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            close_fds=True, start_new_session=True, umask=0o077, **kw))

    def _read(self, out: IO[bytes]) -> None:
        window_start, lines = time.monotonic(), 0
        while True:
            line = out.readline(MAX_LINE + 1)
            if not line:
                return
            lines += 1
            if lines >= _MAX_LINES_PER_S // 10:
                # Pace the reading; a flood waits in the detector's pipe.
                elapsed = time.monotonic() - window_start
                if elapsed < 0.1:
                    time.sleep(0.1 - elapsed)
                window_start, lines = time.monotonic(), 0
            if not line.endswith(b"\n"):
                if len(line) <= MAX_LINE:
                    return  # a last line without its newline, then EOF
                self._complain("a verdict line longer than %d bytes", MAX_LINE)
                while line and not line.endswith(b"\n"):
                    line = out.readline(MAX_LINE + 1)
                continue
            if not line.strip():
                continue
            try:
                v = parse_verdict(line)
            except ValueError as err:
                self._complain("a bad verdict line: %s", str(err))
                continue
            agent = self._by_id.get(v.agent_id)
            if agent is None:
                self.stats.unknown_agents += 1
                continue
            self.stats.verdicts += 1
            if v.verdict == "ok":
                continue
            try:
                self._on_verdict(agent, v)
            except Exception:
                log.exception("acting on a detector verdict")

    def _complain(self, fmt: str, arg: object) -> None:
        self.stats.bad_lines += 1
        now = time.monotonic()
        if now - self._last_complaint >= 10.0:
            self._last_complaint = now
            log.warning("detector sent " + fmt + " (%d bad lines so far)", arg,
                        self.stats.bad_lines)


def _write_all(f: IO[bytes] | None, data: bytes) -> None:
    """Write all of data to an unbuffered pipe. Raises OSError (EPIPE), ValueError (closed)."""
    if f is None or f.closed:
        raise ValueError("the detector's stdin is closed")
    view = memoryview(data)
    while view:
        n = os.write(f.fileno(), view)
        view = view[n:]


def _close(f: IO[bytes] | None) -> None:
    if f is None:
        return
    with contextlib.suppress(OSError):  # nothing left to tell a dead detector
        f.close()
