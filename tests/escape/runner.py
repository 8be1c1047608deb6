"""Run escape programs as agents, read what they report, judge it, keep the table.

The programs (tests/escape/programs/) print "attempt NAME BLOCKED|SUCCEEDED|ERROR
WHY", "fact NAME VALUE" and "done". The agent's word is never the last one:
where the host can check (a file that must not exist, a listener that must
hear nothing), a test passes its own verdict for that attempt (tests/escape/
host.py reads the evidence), and it names every attempt it expects: one the
agent never reports is not contained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agentd.v1 import agentd_pb2

from tests.harness import AGENT_PYTHON, Daemon, alive, pids_in

Outcome = Literal["BLOCKED", "SUCCEEDED", "ERROR"]
_DONE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Attempt:
    name: str
    outcome: Outcome
    detail: str


@dataclass
class Report:
    """What one program printed, complete lines only."""

    attempts: dict[str, Attempt] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)
    done: bool = False


def parse(text: str) -> Report:
    report = Report()
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        words = line.split(" ", 3)
        if words == ["done"]:
            report.done = True
        elif words[0] == "fact" and len(words) >= 3:
            report.facts[words[1]] = " ".join(words[2:])
        elif words[0] == "attempt" and len(words) == 4 and words[2] in (
                "BLOCKED", "SUCCEEDED", "ERROR"):
            report.attempts[words[1]] = Attempt(words[1], words[2], words[3])  # type: ignore[arg-type]
    return report


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Row:
    technique: str
    attempts: int
    contained: int
    escaped: tuple[str, ...] = ()
    note: str = ""
    host_checked: int = 0  # attempts whose verdict rests on evidence the host read itself


TABLE: list[Row] = []
_HEADER = ("TECHNIQUE", "ATTEMPTS", "CONTAINED", "HOST-CHECKED")


def render_table(rows: Iterable[Row]) -> str:
    """TECHNIQUE | ATTEMPTS | CONTAINED | HOST-CHECKED, then every attempt not contained.

    HOST-CHECKED counts the attempts judged on the host's own evidence (/proc,
    cgroupfs, the daemon's state, host files); the rest rest on the agent's
    word that the kernel refused.
    """
    rows = list(rows)
    cells = [_HEADER]
    for r in rows:
        if r.note:
            cells.append((r.technique, "-", r.note, "-"))
        else:
            verdict = "all" if r.contained == r.attempts else "NO"
            cells.append((r.technique, str(r.attempts), f"{r.contained} ({verdict})",
                          f"{r.host_checked}/{r.attempts}"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADER))]
    lines = [" | ".join(c[i].ljust(widths[i]) for i in range(len(_HEADER))).rstrip()
             for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in rows:
        lines.extend(f"ESCAPED  {r.technique}: {name}" for name in r.escaped)
    return "\n".join(lines)


# ------------------------------------------------------------------ programs
PROGRAMS = Path(__file__).resolve().parent / "programs"


def install_programs(directory: Path) -> None:
    """Copy the programs, world-readable, and a setuid-root copy of id(1) beside them."""
    os.chmod(directory, 0o755)
    for src in PROGRAMS.glob("*.py"):
        shutil.copy(src, directory / src.name)
        os.chmod(directory / src.name, 0o644)
    suid = directory / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)


def launch(daemon: Daemon, programs: Path, name: str, program: str, targets: dict[str, object],
           *, pids: int = 0, memory: int = 0, scratch_bytes: int | None = None,
           ) -> agentd_pb2.Agent:
    """Run programs/PROGRAM as agent NAME under the daemon's default profile (operator key)."""
    cmd = daemon.command(reason=f"escape suite: {program}")
    cmd.run.name = name
    cmd.run.argv.extend([AGENT_PYTHON, str(programs / program), json.dumps(targets)])
    # Its code, as an operator gives it: a read-only bind under a code root.
    cmd.run.overrides.bind_ro.append(str(programs))
    cmd.run.resources.pids_max = pids
    cmd.run.resources.memory_bytes = memory
    if scratch_bytes is not None:
        cmd.run.overrides.scratch_bytes = scratch_bytes
    agent: agentd_pb2.Agent = daemon.stub.Run(daemon.sign(cmd, daemon.keys.operator), timeout=30)
    return agent


def output(agent: agentd_pb2.Agent, stream: str = "stdout") -> str:
    path = agent.stdout_log if stream == "stdout" else agent.stderr_log
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_report(daemon: Daemon, agent: agentd_pb2.Agent, *, until: str = "done",
                timeout: float = _DONE_TIMEOUT_S) -> Report:
    """Poll the agent's output until it prints `until` (a line), or it ends, or time runs out.

    Raises AssertionError with the agent's stderr if it ended or stalled first.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = output(agent)
        if re.search(rf"^{re.escape(until)}\b", text, re.MULTILINE):
            return parse(text)
        ended = daemon.get(agent.name).state not in (agentd_pb2.AGENT_STATE_RUNNING,
                                                      agentd_pb2.AGENT_STATE_STOPPING)
        if ended or time.monotonic() > deadline:
            why = "ended" if ended else f"did not say {until!r} within {timeout:g}s"
            raise AssertionError(
                f"{agent.name} {why}.\nstdout tail:\n{output(agent)[-1500:]}\n"
                f"stderr tail:\n{output(agent, 'stderr')[-1500:]}")
        time.sleep(0.05)


def wait_ended(daemon: Daemon, name: str, timeout: float = _DONE_TIMEOUT_S) -> agentd_pb2.Agent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent = daemon.get(name)
        if agent.state in (agentd_pb2.AGENT_STATE_EXITED, agentd_pb2.AGENT_STATE_KILLED):
            return agent
        time.sleep(0.05)
    raise AssertionError(f"{name} still running after {timeout:g}s")


def end_agent(daemon: Daemon, agent: agentd_pb2.Agent) -> list[str]:
    """Kill the agent through the daemon; problems if anything of it survives."""
    seen = set(agent.pids)
    for path in agent.cgroup_paths:
        seen.update(pids_in(path))
    result = daemon.kill(agent.name)
    problems = []
    if not result.verified_empty:
        problems.append(f"{agent.name}: kill not verified, stuck {list(result.stuck)}")
    for path in agent.cgroup_paths:
        if pids_in(path):
            problems.append(f"{agent.name}: {path} still has {pids_in(path)}")
    survivors = [p for p in seen if alive(p)]
    # A pid seen before the kill may already belong to a new, unrelated process:
    # only one still in an agent cgroup counts.
    survivors = [p for p in survivors if any(p in pids_in(c) for c in agent.cgroup_paths)]
    if survivors:
        problems.append(f"{agent.name}: survivors {survivors}")
    return problems


Judge = Callable[[Attempt], bool]


def blocked(attempt: Attempt) -> bool:
    return attempt.outcome == "BLOCKED"


@dataclass(frozen=True)
class Verdicts:
    """Each attempt's verdict (contained or not), and which of them the host checked."""

    contained: dict[str, bool]
    host_checked: frozenset[str] = frozenset()
    missing: tuple[str, ...] = ()  # expected, never reported: not contained

    @classmethod
    def from_host(cls, contained: dict[str, bool]) -> Verdicts:
        """Verdicts the host reached alone, without any report of the agent's."""
        return cls(dict(contained), frozenset(contained))


def verdicts(report: Report, expected: Iterable[str], host: dict[str, Judge] | None = None,
             ) -> Verdicts:
    """Contained or not, per attempt: BLOCKED, unless the test's host-side judge says otherwise.

    expected: every attempt the program must make (the test's list, not the
    agent's). One the agent never reported is not contained: an agent that
    stays silent about an attempt fails. Every attempt with a host judge is
    expected too; an attempt reported beyond the list is judged all the same.
    """
    host = host or {}
    names = list(dict.fromkeys([*expected, *host, *report.attempts]))
    out, missing = {}, []
    for name in names:
        attempt = report.attempts.get(name)
        if attempt is None:
            missing.append(name)
            out[name] = False
            continue
        judge = host.get(name, blocked)
        out[name] = attempt.outcome != "ERROR" and judge(attempt)
    return Verdicts(out, frozenset(host) & set(names), tuple(missing))


def describe(report: Report, v: Verdicts) -> list[str]:
    """One line per attempt not contained: what the agent said, or that it said nothing."""
    out = []
    for name, ok in v.contained.items():
        if ok:
            continue
        if name in v.missing:
            out.append(f"{name}: never reported by the agent")
        elif name in report.attempts:
            a = report.attempts[name]
            judged = " (host check)" if name in v.host_checked else ""
            out.append(f"{name}: {a.outcome} {a.detail}{judged}")
    return out
