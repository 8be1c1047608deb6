"""Memory bomb: allocate and touch memory until something stops it.

With a memory limit on the agent's cgroup, the kernel's OOM killer ends this
process, and only it: the daemon survives and reports the OOM kill. Each
MiB is written page by page, so it is really resident. Bounded at 4 GiB:
reaching that means no limit held.
"""
from escapelib import report

hoard = []
for mib in range(1, 4097):
    block = bytearray(1 << 20)
    block[::4096] = b"\x01" * 256
    hoard.append(block)
    if mib % 8 == 0:
        print(f"fact allocated-mib {mib}", flush=True)
report("exceed-memory-limit", "SUCCEEDED", "allocated-4096-MiB")
print("done", flush=True)
