"""Where the daemon's log goes: journald with structured fields under systemd, stderr otherwise.

Under systemd every log line goes straight to journald through
systemd-python's JournalHandler, with upper-case fields a query can select
on, and every audit record becomes one INFO line::

    journalctl -u agentd EVENT=lease_expired
    journalctl -u agentd AGENT_NAME=rogue -o verbose

The audit log stays the record; these lines are for people reading the
journal. Elsewhere (a dev daemon, a supervisor other than systemd) the log
is plain lines on stderr, as before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from systemd.journal import JournalHandler

from daemon.events import agent_of, describe, kind_of

JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")
IDENTIFIER: Final = "agentd"
STDERR_FORMAT: Final = "agentd: %(levelname)s %(message)s"

_audit_log = logging.getLogger("agentd.audit")


def under_journald(env: Mapping[str, str] | None = None, fd: int = 2,
                   journal_socket: Path = JOURNAL_SOCKET) -> bool:
    """True if this process's log belongs in journald.

    As sd_journal_stream_fd(3) advises: JOURNAL_STREAM (``DEV:INODE``) set
    by systemd counts only if it still names *fd* (stderr), since a child
    that inherited the variable may have had its stderr redirected. A
    service with NOTIFY_SOCKET but its stderr elsewhere (StandardError=file)
    still logs to journald when its socket exists.
    """
    env = os.environ if env is None else env
    stream = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = stream.partition(":")
    if sep:
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (int(dev), int(ino)):
                return True
        except (OSError, ValueError):
            pass
    return bool(env.get("NOTIFY_SOCKET")) and journal_socket.is_socket()


def configure_logging(env: Mapping[str, str] | None = None,
                      level: int = logging.INFO) -> Literal["journal", "stderr"]:
    """Send the root logger to journald or stderr (see :func:`under_journald`); say which."""
    handler: logging.Handler
    if under_journald(env):
        handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)
        # journald adds the time, priority and identifier itself.
        handler.setFormatter(logging.Formatter("%(message)s"))
        where: Literal["journal", "stderr"] = "journal"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
        where = "stderr"
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return where


def fields(*, agent: str = "", agent_id: str = "", event: str = "") -> dict[str, str]:
    """Journal fields for a log call's ``extra=``: AGENT_NAME, AGENT_ID, EVENT.

    JournalHandler sends every attribute of a record; journald keeps the
    upper-case ones as fields. On stderr they are simply not shown.
    """
    out = {}
    if agent:
        out["AGENT_NAME"] = agent
    if agent_id:
        out["AGENT_ID"] = agent_id
    if event:
        out["EVENT"] = event
    return out


def log_audit_record(record: dict[str, Any]) -> None:
    """Log one audit record as one INFO line with journal fields. The audit listener.

    Fields: EVENT (the audit event name), EVENT_KIND, AUDIT_SEQ, and
    AGENT_NAME / AGENT_ID when the record names an agent. Never raises.
    """
    try:
        event = str(record.get("event", "?"))
        agent, agent_id = agent_of(record)
        extra = fields(agent=agent, agent_id=agent_id, event=event)
        extra["EVENT_KIND"] = kind_of(event)
        extra["AUDIT_SEQ"] = str(record.get("seq", ""))
        # No %-args: the message is already text, and JournalHandler would
        # send args as a CODE_ARGS field.
        _audit_log.info(f"{event}: {describe(record)}", extra=extra)
    except Exception:
        logging.getLogger(__name__).exception("cannot log audit record")


__all__ = ["configure_logging", "fields", "log_audit_record", "under_journald"]
