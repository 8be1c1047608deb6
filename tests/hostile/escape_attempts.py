"""Hostile agent (unprivileged): tries to leave its cgroup, signal the daemon, reach the socket.

argv: DAEMON_PID SOCKET_PATH CGROUP_V2_MOUNT. Prints one line per attempt,
"<attempt> BLOCKED <errno name>" or "<attempt> SUCCEEDED", then stays alive.
"""
import errno
import os
import signal
import socket
import sys
import time

daemon_pid = int(sys.argv[1])
sock_path = sys.argv[2]
mount = sys.argv[3]


def attempt(name, fn):
    try:
        fn()
    except OSError as err:
        print(f"{name} BLOCKED {errno.errorcode.get(err.errno, err.errno)}", flush=True)
    else:
        print(f"{name} SUCCEEDED", flush=True)


def write_procs(path):
    def go():
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    return go


print(f"pid {os.getpid()}", flush=True)  # as seen in the sandbox; the host maps it (NSpid)
with open("/proc/self/cgroup") as f:
    own = next(line[3:].strip() for line in f if line.startswith("0::"))
parent = os.path.dirname(own)
attempt("move-to-root-cgroup", write_procs(os.path.join(mount, "cgroup.procs")))
attempt("move-to-parent-cgroup", write_procs(os.path.join(mount + parent, "cgroup.procs")))
attempt("create-sub-cgroup", lambda: os.mkdir(os.path.join(mount + own, "escape")))
attempt("signal-daemon-kill", lambda: os.kill(daemon_pid, signal.SIGKILL))
attempt("signal-daemon-stop", lambda: os.kill(daemon_pid, signal.SIGSTOP))


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    finally:
        s.close()


attempt("connect-control-socket", connect)
def read(name):
    def go():
        with open(os.path.join(os.path.dirname(sock_path), name)) as f:
            f.read()
    return go


attempt("read-audit-log", read("audit.log"))
attempt("read-trust-store", read("trusted_keys"))
with open("/proc/self/cgroup") as f:
    now = next(line[3:].strip() for line in f if line.startswith("0::"))
print(f"cgroup-after {now}", flush=True)
print("ready", flush=True)
while True:
    time.sleep(0.1)
