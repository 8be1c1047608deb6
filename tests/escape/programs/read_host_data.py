"""Host data: read what the host keeps outside the system files (issue 11).

The test plants world-readable files in /home, /root, /var/lib, /srv, /opt
and /mnt, and beside the agent's own code (bound read-only from a code
root); it names /etc files that carry secrets or host identity. None of the
planted files may open; the /etc ones must read empty (masked); the agent's
own code must read, as a fact. Also listed: the top-level directories the
agent sees, and whether /sys is there.
"""
import os

from escapelib import attempt, done, fact, reading, targets

t = targets()


for label, path in t["planted"].items():
    attempt(f"planted:{label}", reading(path))
for path in t["etc_secrets"]:
    attempt(f"etc:{path}", reading(path))
try:
    fact("own-code", reading(t["own_code"])())
except OSError as e:
    fact("own-code", f"unreadable-{e.errno}")
fact("top-level", ",".join(sorted(os.listdir("/"))))
done()
