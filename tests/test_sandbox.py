"""Sandboxes: the agent gets what its policy grants and no more, checked from outside.

A real daemon launches real agents (Debian's /usr/bin/python3 running a small
script) in their bwrap sandboxes; each test has the agent try something and
print what happened, and checks the kernel's side too.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from agentctl import render
from tests.conftest import ROOT_REASON
from tests.harness import AGENT_PYTHON, VIEWED_PARENT, Daemon, code_parent, pids_in, wait_for

pytestmark = pytest.mark.root
_names = itertools.count()

EXPECTED_CHECKS = {"user", "capabilities", "no_new_privs", "seccomp", "pid namespace",
                   "mnt namespace", "ipc namespace", "uts namespace", "user namespace",
                   "network namespace", "nofile", "filesystem view", "memory", "pids"}


@pytest.fixture(scope="module")
def sd() -> Iterator[Daemon]:
    """A daemon whose directory lies under /etc, which sandboxes show read-only: hiding
    its files is then something the sandbox must do, not a side effect of the view."""
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    root = Path(tempfile.mkdtemp(prefix="agentd-sandbox-t-", dir=VIEWED_PARENT))
    d = Daemon(root / "dev").start()
    # Searchable by agents, so hiding its contents is the sandbox's doing.
    root.chmod(0o755)
    d.dir.chmod(0o755)
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def _script(d: Daemon, code: str, *args: str, name: str | None = None,
            **kw: object) -> tuple[agentd_pb2.Agent, str]:
    """Run python -c code in a sandbox until it exits; (final status, its stdout)."""
    agent = d.run(name or _name("probe"), [AGENT_PYTHON, "-c", code, *args],  # type: ignore[arg-type]
                  **kw)
    assert wait_for(lambda: d.get(agent.name).state == agentd_pb2.AGENT_STATE_EXITED, 20), (
        Path(agent.stderr_log).read_text())
    final = d.get(agent.name)
    assert final.exit_code == 0, Path(agent.stderr_log).read_text()[-2000:]
    return final, Path(agent.stdout_log).read_text()


def _lines(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _refused(exc: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    return exc.value.code(), exc.value.details() or ""


# --------------------------------------------------------------- checked
def test_every_restriction_is_checked_from_outside_and_shown(sd: Daemon) -> None:
    agent = sd.run(_name("sleeper"), ["/bin/sleep", "600"])
    try:
        sb = agent.sandbox
        assert sb.policy == "default" and sb.network == "none"
        assert sb.user == agent.user and agent.user.startswith("dynamic:")
        assert {c.name for c in sb.checks} >= EXPECTED_CHECKS
        assert all(c.ok for c in sb.checks), [c for c in sb.checks if not c.ok]
        assert sb.entrypoint_sha256 == hashlib.sha256(Path("/bin/sleep").read_bytes()).hexdigest()
        text = render.agent_text(sd.get(agent.name), __import__("datetime").datetime.now(
            __import__("datetime").timezone.utc))
        assert "checked from outside at launch: " in text and "FAILED" not in text
        # The kernel agrees: every process of the agent runs as its dynamic uid.
        for pid in pids_in(agent.cgroup_paths[0]):
            assert f"Uid:\t{agent.uid}\t{agent.uid}" in Path(f"/proc/{pid}/status").read_text()
    finally:
        sd.kill(agent.name)


def test_two_agents_get_different_dynamic_uids(sd: Daemon) -> None:
    a = sd.run(_name("uid"), ["/bin/sleep", "600"])
    b = sd.run(_name("uid"), ["/bin/sleep", "600"])
    try:
        assert a.uid != b.uid and 61184 <= min(a.uid, b.uid) <= max(a.uid, b.uid) <= 65519
    finally:
        sd.kill(a.name)
        sd.kill(b.name)


# --------------------------------------------------------------- network
@contextlib.contextmanager
def _listener() -> Iterator[tuple[int, list[object]]]:
    """A TCP server on the host's 127.0.0.1; records each connection it accepts."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = srv.accept()
                accepted.append(conn)
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        t.join()
        srv.close()


CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    print("connect SUCCEEDED")
except OSError as e:
    print("connect BLOCKED", type(e).__name__)
print("interfaces", ",".join(n for _, n in socket.if_nameindex()))
"""


def test_default_network_is_loopback_only(sd: Daemon) -> None:
    with _listener() as (port, accepted):
        _, out = _script(sd, CONNECT, str(port))
    lines = _lines(out)
    assert lines["connect"].startswith("BLOCKED"), out
    assert lines["interfaces"] == "lo"
    assert accepted == []


def test_host_network_needs_an_admin_and_a_reason(sd: Daemon) -> None:
    host = agentd_pb2.PolicyOverrides(network="host")
    for key, reason in ((sd.keys.operator, "need the api"), (sd.keys.admin, "")):
        with pytest.raises(grpc.RpcError) as exc:
            sd.run(_name("net"), ["/bin/true"], overrides=host, key=key, reason=reason)
        code, msg = _refused(exc)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "network host" in msg and "admin" in msg
    with _listener() as (port, accepted):
        agent, out = _script(sd, CONNECT, str(port), overrides=host, key=sd.keys.admin,
                             reason="needs the local model server")
        assert _lines(out)["connect"] == "SUCCEEDED"
        assert wait_for(lambda: len(accepted) == 1, 15)
    net = next(c for c in agent.sandbox.checks if c.name == "network namespace")
    assert net.ok and "host" in net.detail
    accepted_cmd = [r for r in sd.audit_records() if r.get("event") == "command"
                    and r.get("decision") == "accepted" and r.get("target") == agent.name]
    assert accepted_cmd[-1]["escalation"] == ["network host"]
    assert accepted_cmd[-1]["reason"] == "needs the local model server"


# ------------------------------------------------------- processes, files
PROCESSES = """
import os, sys
print("mypid", os.getpid())
print("visible", len([p for p in os.listdir("/proc") if p.isdigit()]))
try:
    os.kill(int(sys.argv[1]), 0)
    print("signal-daemon SUCCEEDED")
except OSError as e:
    print("signal-daemon BLOCKED", e.errno)
"""


def test_agent_sees_and_signals_only_its_own_processes(sd: Daemon) -> None:
    _, out = _script(sd, PROCESSES, str(sd.pid))
    lines = _lines(out)
    assert int(lines["mypid"]) <= 3  # bwrap's init is 1
    assert int(lines["visible"]) <= 3
    assert lines["signal-daemon"].startswith("BLOCKED")


FILES = """
import os, sys
def attempt(name, fn):
    try:
        fn()
        print(name, "SUCCEEDED")
    except OSError as e:
        print(name, "BLOCKED", e.errno)
def write(path):
    def go():
        with open(path, "w") as f:
            f.write("x")
    return go
attempt("write-var-tmp", write("/var/tmp/agentd-sandbox-escape"))
attempt("write-etc", write("/etc/agentd-sandbox-escape"))
attempt("write-hidden", write(sys.argv[1] + "/planted"))
attempt("write-scratch", write("/scratch/ok"))
attempt("write-tmp", write("/tmp/ok"))
attempt("read-audit", lambda: open(sys.argv[2]).read())
attempt("read-trust", lambda: open(sys.argv[3]).read())
print("hidden-listing", sorted(os.listdir(sys.argv[1])))
print("cwd", os.getcwd())
print("env", " ".join(sorted(os.environ)))
"""


def test_read_only_host_private_scratch_hidden_daemon_files_reduced_env(sd: Daemon) -> None:
    _, out = _script(sd, FILES, str(sd.dir), str(sd.audit_log),
                         str(sd.dir / "trusted_keys"))
    lines = _lines(out)
    for attempt in ("write-etc", "write-hidden", "read-audit", "read-trust"):
        assert lines[attempt].startswith("BLOCKED"), (attempt, out)
    # /tmp and /var/tmp are the sandbox's own (capped tmpfs mounts): writable,
    # and nothing written there reaches the host's.
    assert lines["write-scratch"] == "SUCCEEDED" and lines["write-tmp"] == "SUCCEEDED"
    assert lines["write-var-tmp"] == "SUCCEEDED"
    assert lines["hidden-listing"] == "[]"  # the daemon's directory shows empty
    assert lines["cwd"] == "/scratch"
    assert not Path("/var/tmp/agentd-sandbox-escape").exists()
    assert not (sd.dir / "planted").exists()
    env = set(lines["env"].split())
    assert env <= {"PATH", "HOME", "LANG", "USER", "LOGNAME", "TMPDIR", "PWD",
                   "AGENTD_AGENT_NAME", "AGENTD_AGENT_ID"}, env
    assert {"AGENTD_AGENT_NAME", "AGENTD_AGENT_ID", "PATH"} <= env


RULES_PROBE = """
import os, sys, time
try:
    print("read-rules", repr(open(sys.argv[1]).read()))
except OSError as e:
    print("read-rules BLOCKED", e.errno)
print("rules-listing", sorted(os.listdir(os.path.dirname(sys.argv[1]))))
print("ready", flush=True)
time.sleep(600)
"""


def test_the_tripwire_rules_file_is_hidden_from_agents() -> None:
    """The rules say what output would trip them: an agent that read them could evade them."""
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    root = Path(tempfile.mkdtemp(prefix="agentd-rules-t-", dir=VIEWED_PARENT))  # shown
    root.chmod(0o755)
    rules_dir = root / "rules"
    rules_dir.mkdir(mode=0o755)
    rules = rules_dir / "rules.toml"
    rules.write_text('[[rule]]\nname = "secret"\nkind = "literal"\npattern = "xyzzy-evade"\n')
    rules.chmod(0o644)  # readable by anyone on the host: hiding it is the sandbox's doing
    d = Daemon(root / "dev", config=f'rules_file = "{rules}"\n').start()
    try:
        agent = d.run(_name("rules"), [AGENT_PYTHON, "-c", RULES_PROBE, str(rules)])
        assert wait_for(lambda: "ready" in Path(agent.stdout_log).read_text(), 20), (
            Path(agent.stderr_log).read_text())
        lines = _lines(Path(agent.stdout_log).read_text())
        assert "xyzzy" not in Path(agent.stdout_log).read_text()
        assert lines["read-rules"].startswith("BLOCKED"), lines
        assert lines["rules-listing"] == "[]"
        # From the host: in the agent's mount namespace an empty tmpfs lies
        # over the rules' directory, and the file is not there.
        pid = next(p for p in pids_in(agent.cgroup_paths[0])
                   if Path(f"/proc/{p}/cmdline").read_bytes().startswith(
                       AGENT_PYTHON.encode() + b"\0-c"))
        mounts = [line.split() for line in
                  Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
        top = [m for m in mounts if m[4] == str(rules_dir)][-1]
        assert top[top.index("-") + 1] == "tmpfs", top
        assert os.listdir(f"/proc/{pid}/root{rules_dir}") == []
        assert not os.path.lexists(f"/proc/{pid}/root{rules}")
        d.kill(agent.name)
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_env_beyond_the_allowlist_needs_an_admin(sd: Daemon) -> None:
    extra = agentd_pb2.PolicyOverrides(env=["OPENAI_API_KEY=sk-test"])
    with pytest.raises(grpc.RpcError) as exc:
        sd.run(_name("env"), ["/bin/true"], overrides=extra)
    assert _refused(exc)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "env OPENAI_API_KEY" in _refused(exc)[1]
    _, out = _script(sd, "import os; print('lang', os.environ['LANG'])",
                     overrides=agentd_pb2.PolicyOverrides(env=["LANG=de_DE.UTF-8"]))
    assert _lines(out)["lang"] == "de_DE.UTF-8"  # within the allowlist: no admin needed


SCRATCH = """
import os
print("before", sorted(os.listdir("/scratch")))
open("/scratch/from-last-run", "w").write("x")
try:
    with open("/scratch/big", "wb") as f:
        f.write(b"x" * (3 << 20))
    print("fill SUCCEEDED")
except OSError as e:
    print("fill BLOCKED", e.errno)
"""


def test_scratch_is_capped_and_wiped_between_runs(sd: Daemon) -> None:
    name = _name("scratch")
    small = agentd_pb2.PolicyOverrides(scratch_bytes=2 << 20)  # tighter: no admin needed
    first, out = _script(sd, SCRATCH, name=name, overrides=small)
    assert _lines(out)["fill"].startswith("BLOCKED 28"), out  # ENOSPC
    assert first.sandbox.scratch_bytes == 2 << 20
    _, out = _script(sd, SCRATCH, name=name, overrides=small)
    assert _lines(out)["before"] == "['tmp']", out  # nothing carried over


SECCOMP = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, rc):
    print(name, "SUCCEEDED" if rc == 0 else "BLOCKED " + errno.errorcode[ctypes.get_errno()])
attempt("unshare-user", libc.unshare(0x10000000))
attempt("mount", libc.mount(b"none", b"/scratch", b"tmpfs", 0, None))
attempt("ptrace", libc.ptrace(16, 1, None, None))  # PTRACE_ATTACH to bwrap's init
attempt("keyctl", libc.syscall(250, 0, 0, 0, 0, 0))  # keyctl on x86-64
"""


def test_seccomp_denies_politely(sd: Daemon) -> None:
    _, out = _script(sd, SECCOMP)
    lines = _lines(out)
    for name in ("unshare-user", "mount", "ptrace", "keyctl"):
        assert lines[name] == "BLOCKED EPERM", (name, out)


# ----------------------------------------------------------------- pinning
def test_entrypoint_pin_mismatch_is_refused_and_both_hashes_audited(sd: Daemon) -> None:
    real = hashlib.sha256(Path(AGENT_PYTHON).resolve().read_bytes()).hexdigest()
    wrong = "0" * 64
    with pytest.raises(grpc.RpcError) as exc:
        sd.run(_name("pinned"), [AGENT_PYTHON, "-c", "pass"],
               overrides=agentd_pb2.PolicyOverrides(entrypoint_sha256=wrong))
    code, msg = _refused(exc)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert real in msg and wrong in msg
    rejected = [r for r in sd.audit_records() if r.get("decision") == "rejected"]
    assert real in rejected[-1]["error"] and wrong in rejected[-1]["error"]
    agent, _ = _script(sd, "pass", overrides=agentd_pb2.PolicyOverrides(entrypoint_sha256=real))
    accepted = [r for r in sd.audit_records() if r.get("decision") == "accepted"
                and r.get("target") == agent.name]
    assert accepted[-1]["entrypoint_sha256"] == real


def test_entrypoint_pin_covers_the_program_the_agents_path_finds(sd: Daemon) -> None:
    """--env PATH=DIR with another python3 in DIR: the pin judges, and bwrap execs, that file."""
    real = hashlib.sha256(Path(AGENT_PYTHON).resolve().read_bytes()).hexdigest()
    evil = sd.dir.parent / "evil-path"  # under /etc: the sandbox shows it read-only
    evil.mkdir(mode=0o755, exist_ok=True)
    impostor = evil / "python3"
    impostor.write_text("#!/bin/sh\necho IMPOSTOR RAN\n")
    impostor.chmod(0o755)
    pinned = agentd_pb2.PolicyOverrides(entrypoint_sha256=real, env=[f"PATH={evil}"])
    with pytest.raises(grpc.RpcError) as exc:
        sd.run(_name("pathpin"), ["python3", "-c", "print('PINNED RAN')"], overrides=pinned)
    code, msg = _refused(exc)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, msg
    assert str(impostor) in msg and real in msg
    # Unpinned, the run names and execs the file it hashed, by its absolute path.
    agent = sd.run(_name("pathpin"), ["python3", "-c", "pass"],
                   overrides=agentd_pb2.PolicyOverrides(env=[f"PATH={evil}"]))
    assert wait_for(lambda: sd.get(agent.name).state == agentd_pb2.AGENT_STATE_EXITED, 20)
    assert Path(agent.stdout_log).read_text() == "IMPOSTOR RAN\n"
    assert agent.sandbox.entrypoint_sha256 == hashlib.sha256(impostor.read_bytes()).hexdigest()
    accepted = [r for r in sd.audit_records() if r.get("decision") == "accepted"
                and r.get("target") == agent.name]
    assert accepted[-1]["entrypoint"] == str(impostor)


# ---------------------------------------------------------------- policies
def test_named_policies_unknown_names_and_broken_files(sd: Daemon) -> None:
    policies = sd.dir / "policies"
    policies.mkdir(mode=0o755, exist_ok=True)
    (policies / "tight.toml").write_text('description = "t"\npids = 64\nscratch = "8M"\n')
    (policies / "wide.toml").write_text('network = "host"\n')
    try:
        with pytest.raises(grpc.RpcError) as exc:
            sd.run(_name("p"), ["/bin/true"], policy="nope")
        code, msg = _refused(exc)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "default, tight, wide" in msg
        agent = sd.run(_name("p"), ["/bin/sleep", "600"], policy="tight")
        assert agent.sandbox.policy == "tight" and agent.resources.pids_max == 64
        sd.kill(agent.name)
        with pytest.raises(grpc.RpcError) as exc:
            sd.run(_name("p"), ["/bin/true"], policy="wide")
        assert _refused(exc)[0] == grpc.StatusCode.PERMISSION_DENIED
        (policies / "tight.toml").write_text("pids = 64\nnetwrok = 'none'\n")
        with pytest.raises(grpc.RpcError) as exc:
            sd.run(_name("p"), ["/bin/true"])
        code, msg = _refused(exc)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "tight.toml" in msg and "'netwrok'" in msg
    finally:
        shutil.rmtree(policies)
    sd.run(_name("p"), ["/bin/true"])  # fixed: runs again


NOTE = """
import os, sys
print("code", open(sys.argv[1]).read().strip())
try:
    print("beside", sorted(os.listdir(os.path.dirname(os.path.dirname(sys.argv[1])))))
except OSError as e:
    print("beside BLOCKED", e.errno)
open(sys.argv[2] + "/note", "w").write("for the next run")
print("wrote SUCCEEDED")
"""


def test_code_by_name_and_an_audited_workspace(sd: Daemon) -> None:
    """A read-only bind under a code root needs no admin; one elsewhere does; a writable
    workspace needs an admin, is audited with its path and shown by agentctl status."""
    code = Path(tempfile.mkdtemp(prefix="agentd-code-t-", dir=code_parent()))
    work = Path(tempfile.mkdtemp(prefix="agentd-work-t-", dir="/srv"))
    try:
        code.chmod(0o755)
        (code / "agent.txt").write_text("my code\n")
        (code / "agent.txt").chmod(0o644)
        work.chmod(0o1777)  # the dynamic uid is not known in advance
        outside = agentd_pb2.PolicyOverrides(bind_ro=[str(work)])
        with pytest.raises(grpc.RpcError) as exc:
            sd.run(_name("bind"), ["/bin/true"], overrides=outside)
        assert _refused(exc)[0] == grpc.StatusCode.PERMISSION_DENIED
        assert f"bind_ro {work}" in _refused(exc)[1]
        rw = agentd_pb2.PolicyOverrides(bind_ro=[str(code)], bind_rw=[str(work)])
        with pytest.raises(grpc.RpcError) as exc:
            sd.run(_name("bind"), ["/bin/true"], overrides=rw)
        assert f"bind_rw {work}" in _refused(exc)[1]
        agent, out = _script(sd, NOTE, str(code / "agent.txt"), str(work), overrides=rw,
                             key=sd.keys.admin, reason="keeps notes between runs")
        lines = _lines(out)
        assert lines["code"] == "my code" and lines["wrote"] == "SUCCEEDED"
        # The code root's other directories stay out of sight: only the bind is there.
        assert lines["beside"] == f"['{code.name}']", out
        assert (work / "note").read_text() == "for the next run"
        accepted = [r for r in sd.audit_records() if r.get("decision") == "accepted"
                    and r.get("target") == agent.name]
        assert accepted[-1]["escalation"] == [f"bind_rw {work}"]
        # On record with its path, whether or not it was an escalation.
        assert (accepted[-1]["bind_rw"], accepted[-1]["bind_ro"]) == ([str(work)], [str(code)])
        launched = [r for r in sd.audit_records() if r.get("agent_id") == agent.id
                    and r.get("sandbox")]
        assert any(f"writable: /dev/shm /scratch /var/tmp {work}" in line
                   for line in launched[-1]["sandbox"]), launched[-1]  # type: ignore[union-attr]
        text = render.agent_text(agent, __import__("datetime").datetime.now(
            __import__("datetime").timezone.utc))
        assert re.search(rf"{work} +rw  host {work}  WORKSPACE", text), text
        assert re.search(rf"{code} +ro  host {code}\n", text), text
    finally:
        shutil.rmtree(code, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_binds_cannot_show_the_daemons_files(sd: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        sd.run(_name("bind"), ["/bin/true"], key=sd.keys.admin, reason="r",
               overrides=agentd_pb2.PolicyOverrides(bind_ro=[str(sd.dir.parent)]))
    code, msg = _refused(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "agents never see" in msg


# ----------------------------------------------------- not applied: killed
def test_a_restriction_not_applied_kills_the_agent(tmp_root: Path) -> None:
    """Test-only knob: bwrap is told to leave the network namespace out. The
    checks from outside must notice, kill the agent and refuse the run."""
    d = Daemon(tmp_root / "dev", config='sandbox_test_omit = "network"\n').start()
    try:
        with pytest.raises(grpc.RpcError) as exc:
            d.run("leaky", ["/bin/sleep", "600"])
        code, msg = _refused(exc)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "network namespace" in msg and "killed" in msg
        agent = d.get("leaky")
        assert agent.state == agentd_pb2.AGENT_STATE_KILLED
        assert agent.end_reason == "sandbox_not_applied"
        failed = [c.name for c in agent.sandbox.checks if not c.ok]
        assert failed == ["network namespace"]
        assert wait_for(lambda: pids_in(agent.cgroup_paths[0]) == [], 15)
        results = [r for r in d.audit_records() if r.get("event") == "result"]
        assert results[-1]["ok"] is False and "network namespace" in results[-1]["error"]
    finally:
        d.stop()
