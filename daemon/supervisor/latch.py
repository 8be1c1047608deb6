"""The emergency-stop latch: once engaged, every run is refused until a signed reset.

It survives daemon restarts and reboots: it lives in a file in the state
directory. Engaging it is a memory write (the estop path kills first and
persists after); clearing it removes the file durably before it counts.
An unreadable latch file counts as engaged: fail closed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from daemon import durable
from daemon.errors import FailedPrecondition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatchState:
    at: float
    reason: str
    by: str


class Latch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.state: LatchState | None = None
        self._unpersisted = False
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.state = LatchState(at=float(data["at"]), reason=str(data["reason"]),
                                    by=str(data["by"]))
        except FileNotFoundError:
            self.state = None
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.state = LatchState(at=time.time(), by="agentd",
                                    reason=f"latch file {self.path} unreadable ({err})")

    @property
    def latched(self) -> bool:
        return self.state is not None

    def engage(self, reason: str, by: str) -> None:
        """Latch in memory at once; persist() makes it durable after the kill."""
        with self._lock:
            if self.state is None:
                self.state = LatchState(at=time.time(), reason=reason, by=by)

    def persist(self) -> None:
        """Write the engaged latch durably (durable.replace). Raises OSError."""
        state = self.state
        if state is None:
            return
        data = json.dumps({"at": state.at, "reason": state.reason, "by": state.by})
        durable.replace(self.path, data.encode("utf-8"), mode=0o600)

    def persist_or_retry(self) -> bool:
        """persist(), or if the disk refuses, remember to retry (see retry()). True if durable.

        The estop has already killed and latched in memory: a full disk must
        not turn it into an error, but a restart before the file is written
        would forget the latch, so the recorder retries until it is.
        """
        try:
            self.persist()
        except OSError as err:
            log.error("estop latch %s not persisted (%s); retrying until it is",
                      self.path, err)
            self._unpersisted = True
            return False
        self._unpersisted = False
        return True

    def retry(self) -> None:
        """Persist a latch the disk refused before, if it is still engaged."""
        if self._unpersisted and self.state is not None:
            self.persist_or_retry()

    def clear(self) -> LatchState | None:
        """Remove the latch durably (unlink, fsync the directory). Returns what was cleared.

        Raises OSError when the file cannot be removed; the latch then stays engaged.
        """
        with self._lock:
            old = self.state
            durable.remove(self.path)
            self.state = None
            return old

    def refuse_run(self, needed: int) -> None:
        """Raise FailedPrecondition if latched, saying how to reset."""
        state = self.state
        if state is None:
            return
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(state.at))
        raise FailedPrecondition(
            f"emergency stop is latched (since {when}, by {state.by}: {state.reason!r}); "
            f"no agent may run until a reset signed by {needed} distinct principal(s): "
            "'agentctl reset' (clears the latch only; it restarts nothing)"
        )

