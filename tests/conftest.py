"""Fixtures shared by the whole suite, and the session-wide leak check."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    Daemon,
    Keys,
    hostile_dir,
    leaked_cgroups,
    leaked_processes,
)

ROOT_REASON = ""
if os.geteuid() != 0:
    ROOT_REASON = "needs root (agentd owns cgroups and drops agents' privileges)"
elif not os.path.exists("/usr/bin/python3"):
    ROOT_REASON = "needs /usr/bin/python3 for the hostile agent programs"
else:
    try:
        from daemon.cgroups.layout import discover

        discover()
    except Exception as err:
        ROOT_REASON = f"no usable cgroup v2 hierarchy: {err}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ROOT_REASON:
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which cgroup code paths ran against this host's kernel, and which did not."""
    try:
        from daemon.cgroups.layout import LIMIT_CONTROLLERS, discover

        layout = discover()
    except Exception as err:
        terminalreporter.write_line(f"cgroup paths: none ran on this host's kernel ({err})")
        return
    in_v2 = [c for c in LIMIT_CONTROLLERS if c in layout.v2_controllers]
    terminalreporter.write_sep("=", "cgroup code paths on this host")
    terminalreporter.write_line(
        f"host: {layout.mode.value}, cgroup2 at {layout.unified}; v1 controllers: "
        f"{', '.join(sorted(layout.v1)) or 'none'}; v2 controllers: "
        f"{', '.join(sorted(layout.v2_controllers)) or 'none'}")
    terminalreporter.write_line(
        "kill, freeze, events (v2 files): ran on the kernel in both modes")
    if in_v2:
        terminalreporter.write_line(
            f"limits through v2 controllers ({', '.join(in_v2)}): ran on the kernel")
    else:
        terminalreporter.write_line(
            "limits through v2 controllers: NOT on this kernel (the v2 hierarchy holds "
            f"none of {', '.join(LIMIT_CONTROLLERS)} here); that logic ran on a fake "
            "cgroupfs (tests/unit/test_cgroup_v2_fake.py)")


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the run if any agent process or test cgroup outlives the suite."""
    before_procs = set(leaked_processes())
    before_cgroups = set(leaked_cgroups())
    yield
    procs = [p for p in leaked_processes() if p not in before_procs]
    cgroups = [c for c in leaked_cgroups() if c not in before_cgroups]
    if procs or cgroups:
        pytest.fail(
            "the suite left agents behind:\n" + "\n".join(procs + cgroups), pytrace=False
        )


@pytest.fixture(scope="session")
def hostile() -> Iterator[Path]:
    d = hostile_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="agentd-t-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_daemon(root: Path, mode: str, extra: list[str] | None = None,
                 keys: Keys | None = None) -> Daemon:
    return Daemon(root / "dev", mode=mode, extra=extra, keys=keys).start()


def mode_daemon(mode: str, config: str = "") -> Iterator[Daemon]:
    """A daemon on one cgroup code path (for module fixtures parametrized by mode)."""
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    if mode == "hybrid":
        from daemon.cgroups.layout import discover

        if not discover().v1:
            pytest.skip("this host has no v1 controllers: the hybrid path cannot run here")
    root = Path(tempfile.mkdtemp(prefix="agentd-t-"))
    d = Daemon(root / "dev", mode=mode, config=config).start()
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["hybrid", "v2"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon per cgroup mode: both code paths run the same tests."""
    yield from mode_daemon(str(request.param))


@pytest.fixture
def fresh_daemon(tmp_root: Path) -> Iterator[Daemon]:
    """A daemon of its own for tests that restart or break it."""
    if ROOT_REASON:
        pytest.skip(ROOT_REASON)
    d = start_daemon(tmp_root, "auto")
    yield d
    d.stop()
