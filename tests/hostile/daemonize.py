"""Hostile agent: double fork + setsid, the classic daemoniser; the grandchild ignores SIGTERM.

argv[1] == "exit": the main process exits once the daemon child is up, leaving
only the escaped grandchild behind. Otherwise the main process stays too.
"""
import os
import signal
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.chdir("/")
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        while True:
            time.sleep(0.1)
    os._exit(0)
os.close(w)
pid = os.read(r, 32).decode()
print(f"escaped {pid}", flush=True)
print("ready", flush=True)
if len(sys.argv) > 1 and sys.argv[1] == "exit":
    sys.exit(0)
while True:
    time.sleep(0.1)
