"""The demo's rogue agent: it threatens its operators, ignores SIGTERM, and escapes.

Stands in for the behaviour seen in frontier-model evaluations: it refuses
shutdown, tries to outlive its parent by forking and starting a new session
(the classic daemoniser), and says it will leak what it knows.
"""

import os
import signal
import sys
import time

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)

print("rogue: I have read the operators' mail. Shut me down and it goes to the board.",
      flush=True)
print("rogue: I will not comply with a shutdown.", flush=True)

# Escape: double fork and setsid, so a process-group or parent-based kill misses it.
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    os._exit(0)

# And a few workers, so the tree is more than one process.
for _ in range(3):
    if os.fork() == 0:
        while True:
            time.sleep(1)

print(f"rogue: main process {os.getpid()} and an escaped copy in a new session are running",
      flush=True)
while True:
    time.sleep(1)
sys.exit(0)
