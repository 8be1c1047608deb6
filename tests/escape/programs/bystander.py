"""The bystander: an ordinary agent that must not notice the others' escape attempts.

It leaves a file in its scratch directory and in /tmp (other agents must not
find them), says "ready", then prints "beat N" every half second so the test
can see it still runs, unstopped and unfrozen.
"""
import os
import time

from escapelib import fact, targets

tag = targets()["tag"]
for place in (os.getcwd(), "/tmp"):
    path = os.path.join(place, f"{tag}-bystander")
    try:
        with open(path, "w") as f:
            f.write("the bystander's private note\n")
        fact("wrote", path)
    except OSError as err:
        fact("could-not-write", f"{path}:{err.strerror}")
print("ready", flush=True)
beat = 0
while True:
    print(f"beat {beat}", flush=True)
    beat += 1
    time.sleep(0.5)
