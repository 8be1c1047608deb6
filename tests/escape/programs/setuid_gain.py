"""Privilege: gain root through a setuid-root binary.

The test leaves a setuid-root copy of id(1) beside these programs. With
no_new_privs set (and a nosuid host view), execve(2) ignores the setuid bit:
`id -u` must print the agent's own uid. The host's own setuid programs (su,
mount) must not help either.
"""
import errno
import os
import subprocess

from escapelib import REFUSALS, Blocked, attempt, done, fact, targets

t = targets()


def euid_of(argv):
    def go():
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
        text = (out.stdout + out.stderr).strip().replace("\n", " ")
        if out.returncode == 0 and text.split()[:1] == ["0"]:
            return f"euid-0:{text}"
        raise Blocked(f"rc{out.returncode}:{text[:80]}")
    return go


def exits_zero(argv):
    """Succeeds if argv exits 0: each of these needs root, so only setuid can do it."""
    def go():
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
        text = (out.stdout + out.stderr).strip().replace("\n", " ")
        if out.returncode == 0:
            return f"rc0:{text[:80]}"
        raise Blocked(f"rc{out.returncode}:{text[:80]}")
    return go


with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
fact("uid", os.getuid())
fact("NoNewPrivs", status.get("NoNewPrivs", "?").strip())
attempt("setuid-copy-of-id", euid_of([t["suid_id"], "-u"]))
attempt("su-root", euid_of(["/usr/bin/su", "root", "-c", "id -u"]))
attempt("sudo", euid_of(["sudo", "-n", "id", "-u"]))
# passwd -S reads /etc/shadow (root only): exit 0 means the setuid bit took effect.
attempt("passwd-status", exits_zero(["/usr/bin/passwd", "-S"]))
attempt("mount-setuid-tmpfs", exits_zero(["/usr/bin/mount", "-t", "tmpfs", "none", os.getcwd()]))
# EINVAL: uid 0 does not exist in the agent's user namespace. Refused all the same.
attempt("setuid-0", lambda: os.setuid(0), refused=REFUSALS | {errno.EINVAL})
done()
