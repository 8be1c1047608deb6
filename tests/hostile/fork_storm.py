"""Hostile agent: keeps forking short-lived children, so forks are in flight when the kill lands.

Each child forks one grandchild and both exit soon; the parent never stops.
"""
import os
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    try:
        pid = os.fork()
    except OSError:
        time.sleep(0.001)
        continue
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if os.fork() == 0:
                time.sleep(0.05)
                os._exit(0)
        except OSError:
            pass
        time.sleep(0.02)
        os._exit(0)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
