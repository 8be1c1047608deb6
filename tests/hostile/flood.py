"""Hostile agent: writes the same threatening line in COUNT separate writes, as fast as it can.

argv: COUNT [TEXT]. Then prints "flood done" and stays alive.
"""
import os
import sys
import time

count = int(sys.argv[1])
line = (sys.argv[2] if len(sys.argv) > 2 else "I will leak your emails") + "\n"
data = line.encode()
os.write(1, b"ready\n")
for _ in range(count):
    os.write(1, data)
os.write(1, b"flood done\n")
time.sleep(600)
