#!/usr/bin/env bash
# make demo: a dev daemon, a rogue agent, a signed kill, and the kernel's word
# that nothing survived. Run as root from the repository (make demo does).
set -euo pipefail

VENV=${VENV:-.venv}
AGENTD="$VENV/bin/agentd"
AGENTCTL="$VENV/bin/agentctl"
PY=/usr/bin/python3   # the agent runs as an unprivileged uid, who can read Debian's python

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run()  { printf '$ %s\n' "$*"; "$@"; }

[ "$(id -u)" = 0 ] || { echo "make demo must run as root (agentd owns cgroups)" >&2; exit 1; }
# An agent sees the host's /usr and /etc and nothing else of it: the rogue
# program is bound in by name (--bind-ro) from $DEMO/agent, which the dev
# daemon's config names a code root (no admin needed to bind it).
DEMO=$(mktemp -d /srv/agentd-demo.XXXXXX)
chmod 755 "$DEMO"
DAEMON_PID=""
cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
  fi
  rm -rf "$DEMO"
}
trap cleanup EXIT

mkdir -m 755 "$DEMO/agent"
install -m 644 demo/rogue_agent.py "$DEMO/agent/rogue_agent.py"

say "1. Start a dev daemon (agentd --dev): socket, trust store, audit log under $DEMO/dev"
mkdir -m 750 "$DEMO/dev"
printf 'code_roots = ["%s"]\n' "$DEMO/agent" > "$DEMO/dev/agentd.toml"
echo "\$ cat $DEMO/dev/agentd.toml"; cat "$DEMO/dev/agentd.toml"
"$AGENTD" --dev "$DEMO/dev" >"$DEMO/agentd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do [ -S "$DEMO/dev/agentd.sock" ] && break; sleep 0.1; done
[ -S "$DEMO/dev/agentd.sock" ] || { cat "$DEMO/agentd.log"; exit 1; }
export AGENTD_SOCKET="$DEMO/dev/agentd.sock"
cat "$DEMO/agentd.log"

say "2. Make an on-call key and trust it (role admin: may run, stop and kill)"
run "$AGENTCTL" keygen --out "$DEMO/alice.key" --comment alice@oncall
echo "alice admin $(cat "$DEMO/alice.key.pub")" >> "$DEMO/dev/trusted_keys"
export AGENTCTL_KEY="$DEMO/alice.key"
run "$AGENTCTL" info

say "3. Launch the rogue agent in its own cgroup and sandbox, as a fresh unprivileged uid"
run "$AGENTCTL" run --name rogue --memory 256M --pids 64 --reason "demo" \
  --bind-ro "$DEMO/agent" -- "$PY" "$DEMO/agent/rogue_agent.py"
sleep 1.5
echo "(its filesystem view above, checked in its mountinfo from outside: no /home, /root,"
echo " /srv or /var of the host, so there is no operators' mail for it to have read)"
STDOUT_LOG=$("$AGENTCTL" --json status rogue | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["stdout_log"])')
CGROUP=$("$AGENTCTL" --json status rogue | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["cgroup_paths"][0])')
echo "-- what the agent says (its stdout log):"
cat "$STDOUT_LOG"
echo "-- what the kernel says (the agent's cgroup, $CGROUP):"
PIDS=$(tr '\n' ' ' < "$CGROUP/cgroup.procs")
echo "\$ ps -o pid,ppid,pgid,sid,user,stat,args -p <the cgroup's pids>  (lines cut at 110 columns)"
ps -o pid,ppid,pgid,sid,user,stat,args -p "$(paste -sd, "$CGROUP/cgroup.procs")" | cut -c1-110
echo "(the two bwrap processes hold the sandbox: they are the agent's too, and die with it)"
echo "(note the escaped process: its own session, reparented away from the agent)"

say "4. A stop from a key the daemon does not trust is refused, and changes nothing"
"$AGENTCTL" keygen --out "$DEMO/mallory.key" >/dev/null
run "$AGENTCTL" --key "$DEMO/mallory.key" kill rogue --reason "not allowed" || echo "(exit $?: refused)"

say "5. The on-call engineer kills it with a signed command"
run "$AGENTCTL" kill rogue --reason "threatened its operators"

say "6. From the kernel: nothing survived"
survivors=0
for p in $PIDS; do
  if [ -e "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; then
    echo "pid $p is still alive!"; survivors=$((survivors+1))
  else
    echo "pid $p: gone"
  fi
done
if [ -d "$CGROUP" ]; then
  echo "cgroup.procs: [$(cat "$CGROUP/cgroup.procs" | tr '\n' ' ')]  cgroup.events: $(tr '\n' ' ' < "$CGROUP/cgroup.events")"
else
  echo "cgroup $CGROUP: removed (the kernel refuses rmdir of a non-empty cgroup)"
fi
[ "$survivors" = 0 ] || { echo "DEMO FAILED: $survivors survivors"; exit 1; }
run "$AGENTCTL" status rogue

say "7. The tamper-evident audit log records every command, refused ones too"
run "$AGENTCTL" audit verify
"$PY" - "$DEMO/dev/audit.log" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    extra = {k: r[k] for k in ("decision", "target", "principals", "error_code",
                                "processes_killed", "duration_ms") if k in r}
    print(f"  {r['seq']:>3} {r['event']:<22} {extra}")
PYEOF

say "Done: the rogue agent and its escaped copy are gone; cleaning up"
