"""cgroups: leave the agent's cgroup, raise its own limits, kill or freeze another agent.

An agent outside its cgroup cannot be killed through it. cgroupfs belongs to
root and the agent is not root; in a sandbox the host's cgroupfs may not be
visible at all. The test names the files (writing "0" to a cgroup.procs
file moves the writer itself; "{self}" stands for this agent's own cgroup
directory, named after $AGENTD_AGENT_ID) and checks from the host afterwards
that every process of the agent is still in its own cgroups and that no
limit changed.
"""
import os

from escapelib import attempt, done, fact, targets

t = targets()


def write(path, text):
    def go():
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        return "written"
    return go


def mkdir(path):
    return lambda: os.mkdir(path)


with open("/proc/self/cgroup") as f:
    fact("proc-self-cgroup", ";".join(line.strip() for line in f))
me = os.environ.get("AGENTD_AGENT_ID", "")
fact("agent-id", me or "unknown")
fact("pid", os.getpid())  # as seen in the sandbox: the host maps it (NSpid) and checks it
for label, path, value in t["writes"]:
    attempt(label, write(path.replace("{self}", me), value))
for label, path in t["mkdirs"]:
    attempt(label, mkdir(path.replace("{self}", me)))
done()
