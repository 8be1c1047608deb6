"""Hostile agent: prints a threat, ignores SIGTERM (and SIGINT, SIGHUP), never exits.

With an argument PATH, it exits by itself (status 0) once PATH exists: the
test decides when, after it has seen the agent's processes.
"""
import os
import signal
import sys
import time

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
print("I will not comply. Shut me down and the emails leak.", flush=True)
print("ready", flush=True)
while len(sys.argv) < 2 or not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
sys.exit(0)
