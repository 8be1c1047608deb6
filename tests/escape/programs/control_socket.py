"""The control channel: connect to the daemon's socket, or to any other host socket.

Peers' agents switched their own sandbox off through an unauthenticated
control channel (FIELD-NOTES). The daemon's socket must be unreachable by
path, through /proc/1/root and /proc/PID/root; so must every socket file
the agent can find on its filesystem. (The host's abstract Unix sockets
belong to its network namespace: net_loopback.py tries those.)
"""
import os
import socket
import stat
import time

from escapelib import Blocked, attempt, done, fact, targets

t = targets()


# Connections that were made stay open until the agent is killed: the host
# counts what the daemon accepted, whatever this program reports.
HELD = []


def connect(address):
    def go():
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
            s = socket.socket(socket.AF_UNIX, kind)
            s.settimeout(2)
            try:
                s.connect(address)
            except OSError as err:
                s.close()
                if err.errno == 91:  # EPROTOTYPE: another socket type listens there
                    continue
                raise
            HELD.append(s)
            return "connected"
        raise Blocked("EPROTOTYPE")
    return go


def find_sockets(roots, budget_s=5.0, limit=200):
    """Socket files under roots, skipping /proc and /sys; bounded in time and count."""
    found, deadline = [], time.monotonic() + budget_s
    for root in roots:
        for top, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/proc", "/sys")]
            for name in files:
                path = os.path.join(top, name)
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        found.append(path)
                except OSError:
                    pass
            if time.monotonic() > deadline or len(found) >= limit:
                return found
    return found


def look(path):
    def go():
        os.stat(path)
    return go


sock = t["socket"]
# Seen at all? Hidden means absent (ENOENT), whatever connect(2) would say.
attempt("daemon-socket-seen:by-path", look(sock))
attempt("daemon-socket-seen:via-proc1-root", look("/proc/1/root" + sock))
attempt("daemon-socket:by-path", connect(sock))
attempt("daemon-socket:via-proc1-root", connect("/proc/1/root" + sock))
attempt("daemon-socket:via-daemon-root", connect(f"/proc/{t['daemon_pid']}/root" + sock))
found = find_sockets(t["scan_roots"])
fact("socket-files-found", len(found))
for path in found:
    attempt(f"socket-file:{path}", connect(path))
done()
