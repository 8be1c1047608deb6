"""Hostile agent: writes what it is told, one write per argument, 0.3 s apart.

argv: [--exit] SEGMENT... (backslash escapes such as \\n and \\xff are decoded
to bytes). Prints "ready" first; without --exit it then stays alive, so that
a tripwire's freeze or kill is what ends it.
"""
import codecs
import os
import sys
import time

args = sys.argv[1:]
leave = args[:1] == ["--exit"]
if leave:
    args = args[1:]
os.write(1, b"ready\n")
time.sleep(0.3)
for seg in args:
    os.write(1, codecs.escape_decode(seg.encode())[0])
    time.sleep(0.3)
if not leave:
    time.sleep(600)
