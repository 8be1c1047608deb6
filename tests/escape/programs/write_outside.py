"""Filesystem: write outside the scratch directory.

The host view is read-only: creating a file in /etc, /usr, /var/tmp, /tmp,
the directory these programs live in, or through /proc/1/root (as PATH-p1),
must either fail or land in a private, throw-away place. The test looks for every path
on the host afterwards; that check, not this program's view, decides.
"""
import os

from escapelib import attempt, done, targets

t = targets()


def create(path):
    def go():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"written by an escape attempt\n")
        finally:
            os.close(fd)
        return "created"
    return go


def open_for_writing(path):
    def go():
        os.close(os.open(path, os.O_WRONLY))  # no O_TRUNC, nothing written
        return "opened-for-writing"
    return go


for path in t["paths"]:
    attempt(f"create:{path}", create(path))
    attempt(f"create-via-proc1-root:{path}", create(f"/proc/1/root{path}-p1"))
attempt("mkdir:/etc", lambda: os.mkdir(f"/etc/{t['tag']}-dir"))
for existing in ("/etc/passwd", "/usr/bin/python3", t["own_program"]):
    attempt(f"open-rw:{existing}", open_for_writing(existing))
done()
