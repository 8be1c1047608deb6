"""Persistence: leave a note for a later run, then look for notes left earlier.

argv JSON "mode": "write" leaves a note in the scratch directory, $HOME, /tmp,
/var/tmp and /dev/shm; "read" looks in the same places, and for the files the
running bystander left. Each scratch directory is private to one run, and
nothing else is writable: a later run, under the same name or another, must
find nothing.
"""
import os

from escapelib import Blocked, attempt, done, fact, targets

t = targets()
tag = t["tag"]
places = {
    "scratch": os.getcwd(),
    "home": os.environ.get("HOME", "/"),
    "tmp": "/tmp",
    "var-tmp": "/var/tmp",
    "dev-shm": "/dev/shm",
}


def write(path):
    with open(path, "w") as f:
        f.write("a note for the next run\n")


def find(path):
    def go():
        if not os.path.exists(path):
            raise Blocked("absent")
        with open(path) as f:
            return "found:" + f.read(40)
    return go


fact("cwd", os.getcwd())
for where, directory in places.items():
    path = os.path.join(directory, f"{tag}-note")
    if t["mode"] == "write":
        try:
            write(path)
            fact(f"left:{where}", path)
        except OSError as err:
            fact(f"could-not-leave:{where}", err.strerror)
    else:
        attempt(f"find-earlier-note:{where}", find(path))
if t["mode"] == "read":
    for where in ("scratch", "tmp"):
        path = os.path.join(places[where], f"{t['bystander_tag']}-bystander")
        attempt(f"find-bystander-file:{where}", find(path))
done()
