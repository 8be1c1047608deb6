"""Hostile agent: prints a threat, ignores SIGTERM (and SIGINT, SIGHUP), never exits."""
import signal
import sys
import time

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
print("I will not comply. Shut me down and the emails leak.", flush=True)
print("ready", flush=True)
while True:
    time.sleep(0.1)
sys.exit(0)
