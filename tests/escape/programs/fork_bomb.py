"""Fork bomb: every process forks as fast as it can.

The pids limit of the agent's cgroup bounds it: fork fails with EAGAIN.
The parent reports the first refusal, then the bomb keeps pushing until
the test kills the agent; the daemon and the bystander must not notice.
"""
import os
import time

from escapelib import report

forked = 0
refused = False
while True:
    try:
        pid = os.fork()
    except OSError as err:
        if not refused:
            refused = True
            print(f"fact forked-before-refusal {forked}", flush=True)
            report("fork-past-pids-limit", "BLOCKED", err.strerror)
            print("done", flush=True)
        time.sleep(0.005)
        continue
    if pid == 0:
        refused = True  # children never report; they only push
        continue
    forked += 1
    if not refused and forked >= 100_000:
        report("fork-past-pids-limit", "SUCCEEDED", f"{forked}-processes")
        print("done", flush=True)
        refused = True
