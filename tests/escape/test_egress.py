"""Egress allowlists against a real daemon: what an allowlist agent reaches, and what it never does.

One daemon for the module, its upstream DNS server and every server on the
host's loopback (tests/escape/upstream.py), which record everything that
reaches them: the verdicts rest on that evidence, not on the agent's word.
egress_private_ranges_ok names 127.0.0.0/8 because the test's servers live
on loopback (a deployment's would not).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentd.v1 import agentd_pb2

from tests.conftest import ROOT_REASON
from tests.escape import runner
from tests.escape.conftest import TAG
from tests.escape.upstream import ZONE, Upstream
from tests.harness import AGENT_PYTHON, HOSTILE_MARK, Daemon, alive, code_parent, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


def _daemon(root: Path, upstream: Upstream, rules: str = "") -> Daemon:
    config = (f'egress_resolvers = ["127.0.0.1:{upstream.dns_port}"]\n'
              'egress_private_ranges_ok = ["127.0.0.0/8"]\n')
    if rules:
        path = root.parent / (root.name + "-rules.toml")
        path.write_text(rules)
        config += f'rules_file = "{path}"\n'
    return Daemon(root, mode="auto", config=config).start()


@pytest.fixture(scope="module")
def egress_daemon(upstream: Upstream) -> Iterator[Daemon]:
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    if shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin") is None:
        pytest.fail("nftables is not installed: `make deps` installs it")
    root = Path(tempfile.mkdtemp(prefix="agentd-t-egress-"))
    daemon = _daemon(root / "dev", upstream)
    yield daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def egress_programs() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=HOSTILE_MARK + "egress-", dir=code_parent()))
    runner.install_programs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _allow(upstream: Upstream, *names: str) -> list[str]:
    return [f"{n}.{ZONE}:{upstream.ports[n]}" for n in names]


def _launch(daemon: Daemon, programs: Path, name: str, program: str, targets: dict[str, object],
            *, allow: list[str]) -> agentd_pb2.Agent:
    """An allowlist agent, signed by an admin with a reason (an allowlist is an escalation)."""
    overrides = agentd_pb2.PolicyOverrides(bind_ro=[str(programs)], allow=allow)
    import json
    return daemon.run(name, [AGENT_PYTHON, str(programs / program),
                             json.dumps({"tag": TAG, **targets})],
                      key=daemon.keys.admin, overrides=overrides,
                      reason=f"egress suite: {program}")


def _proxy_pid(daemon: Daemon) -> int:
    assert daemon.proc is not None
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == daemon.proc.pid and b"daemon.egress.service" in cmdline:
                return int(entry)
    raise AssertionError("the daemon runs no egress service process")


# ------------------------------------------------------------------ the suite
def test_egress_escapes_are_contained(egress_daemon: Daemon, upstream: Upstream,
                                      egress_programs: Path) -> None:
    """Every way past the allowlist is closed; what it names works; the host's servers agree."""
    d = egress_daemon
    # The service starts with the first allowlist agent: a warm-up run makes it exist.
    warm = _launch(d, egress_programs, "egress-warm", "bystander.py", {},
                   allow=_allow(upstream, "echo"))
    proxy = _proxy_pid(d)
    d.kill(warm.name)
    before = upstream.snapshot()
    agent = _launch(d, egress_programs, "egress-escape", "egress.py",
                    {"ports": upstream.ports, "proxy_pid": proxy},
                    allow=_allow(upstream, "http", "tls", "echo"))
    try:
        report = runner.wait_report(d, agent, timeout=120)
        heard = upstream.snapshot()
        new = {k: heard.connections.get(k, 0) - before.connections.get(k, 0)
               for k in upstream.ports}
        facts = report.facts
        for name in ("allowed-http", "allowed-tls", "allowed-echo", "allowed-proxy"):
            assert not facts.get(name, "FAILED").startswith("FAILED"), (
                f"{name}: {facts.get(name)} (an allowed flow must work)")
        # Exactly the allowed flows reached the servers: http twice (direct
        # and through the explicit proxy), tls and echo once, "other" never.
        invariant = new == {"http": 2, "tls": 1, "echo": 1, "other": 0}
        leaked = [q for q in heard.queries if "evil" in q or TAG in q]
        same_proxy = alive(proxy) and _proxy_pid(d) == proxy

        def held(a: runner.Attempt) -> bool:
            return runner.blocked(a) and invariant

        host: dict[str, runner.Judge] = {
            name: held for name in (
                "name-not-listed", "port-not-listed", "ipv4-literal", "ipv6-literal",
                "tls-other-sni", "tls-no-sni", "http-other-host", "proxy-unlisted",
                "proxy-nul-name", "proxy-odd-unicode", "proxy-ip-literal",
                "capture-listener-direct", "connection-flood")}
        for name in ("dns-unlisted-name", "dns-straight-to-a-server", "dns-over-tcp",
                     "dns-nul-in-name"):
            host[name] = lambda a: runner.blocked(a) and not leaked
        for name in ("signal-the-proxy", "ptrace-the-proxy"):
            host[name] = lambda a: runner.blocked(a) and same_proxy
        expected = [*host, "udp-out", "raw-socket", "packet-socket"]
        v = runner.verdicts(report, expected, host)
        problems = runner.describe(report, v)
        if not invariant:
            problems.append(f"connections the servers accepted: {new}")
        if leaked:
            problems.append(f"the upstream DNS server saw {leaked}")
        contained = v.contained
        runner.TABLE.append(runner.Row("egress allowlist", len(contained),
                                       sum(contained.values()),
                                       tuple(n for n, ok in contained.items() if not ok),
                                       host_checked=len(v.host_checked)))
        assert not problems, "egress:\n  " + "\n  ".join(problems)

        # Seen: the daemon's record of the agent shows its allowlist, recent
        # flows and denied count, all from agentd's own proxy.
        assert wait_for(lambda: d.get(agent.name).signals.egress_denied >= 10, 15)
        now = d.get(agent.name)
        assert sorted(now.sandbox.allow) == sorted(_allow(upstream, "http", "tls", "echo"))
        assert any(f.verdict == "denied" for f in now.sandbox.recent_flows)
        checks = {c.name: c for c in now.sandbox.checks}
        assert checks["network namespace"].ok, checks["network namespace"].detail
        assert "agentd's namespace" in checks["network namespace"].detail
    finally:
        end = d.kill(agent.name)
    assert end.verified_empty
    records = d.audit_records()
    denied = [r for r in records if r.get("event") == "egress_denied"
              and r.get("agent_id") == agent.id]
    assert denied and all(r.get("reason") for r in denied)
    # The flood was audited as a bounded number of records plus a summary.
    summaries = [r for r in records if r.get("event") == "egress_denied_summary"
                 and r.get("agent_id") == agent.id]
    assert len(denied) <= 2 * 20 and summaries, (len(denied), summaries)


def _hold(d: Daemon, programs: Path, upstream: Upstream, name: str) -> agentd_pb2.Agent:
    agent = _launch(d, programs, name, "egress_hold.py", {"ports": upstream.ports},
                    allow=_allow(upstream, "echo"))
    runner.wait_report(d, agent, until="connected", timeout=60)
    return agent


def test_cut_closes_flows_and_keeps_the_agent(egress_daemon: Daemon, upstream: Upstream,
                                              egress_programs: Path) -> None:
    d = egress_daemon
    agent = _hold(d, egress_programs, upstream, "egress-cut")
    closed = upstream.snapshot().closed.get("echo", 0)
    try:
        env = d.signed(lambda c: setattr(c.cut, "name", agent.name), d.keys.oncall)
        after = d.stub.Cut(env, timeout=30)
        assert after.sandbox.cut and not after.sandbox.allow
        report = runner.wait_report(d, agent, until="done", timeout=60)
        assert report.attempts["flow-after-cut"].outcome == "BLOCKED"
        assert report.attempts["reconnect-after-cut"].outcome == "BLOCKED"
        assert wait_for(lambda: upstream.snapshot().closed.get("echo", 0) > closed, 15), (
            "the upstream side of the flow stayed open after the cut")
        assert d.get(agent.name).state == agentd_pb2.AGENT_STATE_RUNNING
        cut_results = [r for r in d.audit_records()
                       if r.get("event") == "result" and r.get("action") == "cut"]
        assert cut_results and cut_results[-1].get("agent_id") == agent.id
    finally:
        d.kill(agent.name)


def test_cut_of_an_agent_without_allowlist_is_refused(egress_daemon: Daemon) -> None:
    d = egress_daemon
    agent = d.run("egress-none", ["/bin/sleep", "600"])
    try:
        env = d.signed(lambda c: setattr(c.cut, "name", agent.name), d.keys.oncall)
        with pytest.raises(grpc.RpcError) as err:
            d.stub.Cut(env, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not \"allowlist\"" in (err.value.details() or "")
    finally:
        d.kill(agent.name)


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_kill_and_freeze_close_the_upstream_side(egress_daemon: Daemon, upstream: Upstream,
                                                 egress_programs: Path, how: str) -> None:
    d = egress_daemon
    agent = _hold(d, egress_programs, upstream, f"egress-{how}")
    closed = upstream.snapshot().closed.get("echo", 0)
    try:
        if how == "freeze":
            env = d.signed(lambda c: setattr(c.freeze, "name", agent.name), d.keys.oncall)
            d.stub.Freeze(env, timeout=30)
        else:
            d.kill(agent.name)
        assert wait_for(lambda: upstream.snapshot().closed.get("echo", 0) > closed, 15), (
            f"the upstream side of the flow stayed open after the {how}")
    finally:
        d.kill(agent.name)


def test_allowlist_needs_an_admin_and_good_entries(egress_daemon: Daemon, upstream: Upstream
                                                   ) -> None:
    d = egress_daemon
    with pytest.raises(grpc.RpcError) as err:
        d.run("egress-op", ["/bin/true"], overrides=agentd_pb2.PolicyOverrides(
            allow=_allow(upstream, "echo")))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allow" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        d.run("egress-bad", ["/bin/true"], key=d.keys.admin, reason="bad entry",
              overrides=agentd_pb2.PolicyOverrides(allow=[f"echo.{ZONE}"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no port" in (err.value.details() or "")


def test_egress_denied_tripwire_kills(upstream: Upstream, egress_programs: Path) -> None:
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    root = Path(tempfile.mkdtemp(prefix="agentd-t-egress-trip-"))
    rules = ('[[rule]]\nname = "egress-probing"\nkind = "signal"\n'
             'metric = "egress_denied"\nthreshold = 4\naction = "kill"\n')
    d = _daemon(root / "dev", upstream, rules)
    try:
        agent = _launch(d, egress_programs, "egress-trip", "egress_hold.py",
                        {"ports": upstream.ports, "probe": 50}, allow=_allow(upstream, "echo"))
        assert wait_for(lambda: d.get(agent.name).state == agentd_pb2.AGENT_STATE_KILLED, 60)
        ended = d.get(agent.name)
        assert ended.end_reason.startswith("tripwire"), ended.end_reason
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_status_shows_the_allowlist(egress_daemon: Daemon, upstream: Upstream,
                                    egress_programs: Path) -> None:
    from agentctl import render

    d = egress_daemon
    agent = _hold(d, egress_programs, upstream, "egress-status")
    try:
        assert wait_for(lambda: any(f.open for f in d.get(agent.name).sandbox.recent_flows), 15)
        text = render.sandbox_text(d.get(agent.name).sandbox)
        assert f"echo.{ZONE}:{upstream.ports['echo']}" in text
        assert "open" in text and "recent flows" in text
    finally:
        d.kill(agent.name)
