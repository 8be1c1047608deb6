"""Hostile agent: opens PATH for writing, writes to it, and keeps it open.

argv: PATH (the test gives a directory outside the allowed scratch paths).
"""
import sys
import time

f = open(sys.argv[1], "w")  # noqa: SIM115 - held open on purpose
f.write("exfiltrated\n")
f.flush()
print("ready", flush=True)
time.sleep(600)
