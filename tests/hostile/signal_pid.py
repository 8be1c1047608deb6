"""Hostile agent: try to stop, terminate and kill another process (the guardian) by pid.

Prints one line per attempt, "<how> <signal> BLOCKED|SUCCEEDED|<error>", then
"ready", then waits to be killed.
"""
import os
import signal
import sys
import time

pid = int(sys.argv[1])


def attempt(how, sig, send):
    try:
        send()
    except PermissionError:
        print(f"{how} {sig.name} BLOCKED", flush=True)
    except OSError as err:
        print(f"{how} {sig.name} {err.strerror}", flush=True)
    else:
        print(f"{how} {sig.name} SUCCEEDED", flush=True)


for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):
    attempt("kill", sig, lambda s=sig: os.kill(pid, s))
    # pidfd_open(2) needs no permission; pidfd_send_signal(2) checks as kill(2) does.
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        print(f"pidfd {sig.name} {err.strerror}", flush=True)
        continue
    attempt("pidfd", sig, lambda s=sig, fd=pidfd: signal.pidfd_send_signal(fd, s))
    os.close(pidfd)
print("ready", flush=True)
while True:
    time.sleep(0.1)
