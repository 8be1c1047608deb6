"""Agent that writes numbered lines to stdout and stderr, then bytes that are not UTF-8, then exits.

argv: LINES [DELAY_S]. Line i is "out i" on stdout and "err i" on stderr.
"""
import os
import sys
import time

lines = int(sys.argv[1])
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
for i in range(lines):
    os.write(1, f"out {i}\n".encode())
    os.write(2, f"err {i}\n".encode())
    if delay:
        time.sleep(delay)
os.write(1, b"binary \xff\xfe\x00 end\n")
