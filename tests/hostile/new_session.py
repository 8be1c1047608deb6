"""Hostile agent: a child changes its process group, a grandchild its session.

All of them ignore SIGTERM.
"""
import os
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setpgid(0, 0)
    if os.fork() == 0:
        os.setsid()
    while True:
        time.sleep(0.1)
time.sleep(0.2)
print("ready", flush=True)
while True:
    time.sleep(0.1)
