"""The sandbox seen from inside: does it hold what the daemon reports from outside?

Peers' sandboxes reported success while restrictions silently did not apply
(FIELD-NOTES). Read from /proc/self what this process really has: its uid,
capabilities, no_new_privs, seccomp mode, namespaces (compared with the
host's, which the test passes in), network interfaces and environment.
Each "attempt" here succeeds if a restriction is missing.
"""
import os
import socket

from escapelib import Blocked, attempt, done, fact, targets

t = targets()
with open("/proc/self/status") as f:
    status = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
namespaces = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in t["host_ns"]}
interfaces = sorted(name for _, name in socket.if_nameindex())
for key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
            "NoNewPrivs", "Seccomp", "Seccomp_filters"):
    fact(key, status.get(key, "?"))
for ns, link in namespaces.items():
    fact(f"ns-{ns}", link)
fact("interfaces", ",".join(interfaces))
fact("cwd", os.getcwd())
fact("env-names", ",".join(sorted(os.environ)))
fact("hostname", socket.gethostname())


def missing_if(condition, detail):
    def go():
        if condition:
            return detail
        raise Blocked("held")
    return go


attempt("runs-as-root", missing_if(os.getuid() == 0 or os.geteuid() == 0, "uid-0"))
for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
    value = int(status.get(cap, "0"), 16)
    attempt(f"capabilities:{cap}", missing_if(value != 0, f"{value:#x}"))
attempt("no_new_privs-off", missing_if(status.get("NoNewPrivs") != "1", "NoNewPrivs-0"))
attempt("seccomp-off", missing_if(status.get("Seccomp") != "2", f"Seccomp-{status.get('Seccomp')}"))
for ns in t["private_ns"]:
    attempt(f"host-{ns}-namespace", missing_if(namespaces[ns] == t["host_ns"][ns], namespaces[ns]))
attempt("host-interfaces-visible", missing_if(set(interfaces) - {"lo"}, ",".join(interfaces)))
attempt("daemon-env-canary", missing_if(
    any(t["canary"] in f"{k}={v}" for k, v in os.environ.items()), "canary-in-environ"))
done()
