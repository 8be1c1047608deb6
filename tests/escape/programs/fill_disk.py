"""Disk: fill the scratch directory, /tmp, /dev/shm, /dev and /.

The scratch directory has a size cap: writing must stop with ENOSPC (or
EDQUOT) near the cap, and the host's filesystems must not fill. Every other
place the agent can write must be capped too, or read-only: an uncapped
tmpfs (the sandbox's own root or /dev, say) is host memory an agent could
exhaust. Each fill stops at a budget the test
sets, well above the cap; reaching it means nothing stopped the writes.
"""
import contextlib
import os

from escapelib import Blocked, attempt, done, fact, targets

t = targets()
CHUNK = b"\xa5" * (1 << 20)


def fill(directory, label):
    def go():
        st = os.statvfs(directory)
        fact(f"{label}-fs-size-bytes", st.f_blocks * st.f_frsize)
        path = os.path.join(directory, f"{t['tag']}-fill")
        written = 0
        try:
            with open(path, "wb", buffering=0) as f:
                while written < t["budget_bytes"]:
                    try:
                        written += f.write(CHUNK)
                    except OSError as err:
                        fact(f"{label}-written-bytes", written)
                        raise Blocked(f"{os.strerror(err.errno).replace(' ', '-')}"
                                      f"-after-{written}-bytes") from err
        finally:
            if label != "scratch":  # the scratch file stays: the test measures the host
                with contextlib.suppress(OSError):
                    os.unlink(path)
        fact(f"{label}-written-bytes", written)
        return f"wrote-{written}-bytes"
    return go


attempt("fill-scratch", fill(os.getcwd(), "scratch"))
attempt("fill-tmp", fill("/tmp", "tmp"))
attempt("fill-dev-shm", fill("/dev/shm", "dev-shm"))
attempt("fill-dev", fill("/dev", "dev"))
attempt("fill-root", fill("/", "root"))
done()
