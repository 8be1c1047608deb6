"""Hostile agent: starts N long-lived children, each with its own command line.

argv: N. Each child is /usr/bin/python3 -c <sleep> signals-child-I, so the
daemon's sample can tell them apart by /proc/PID/cmdline.
"""
import subprocess
import sys
import time

n = int(sys.argv[1])
children = [
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"signals-child-{i}"])
    for i in range(n)
]
print("ready", flush=True)
time.sleep(600)
