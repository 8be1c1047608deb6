"""daemon.children: orphans are reaped, children a Popen owns are left to it.

Each case runs in a subprocess of its own: a child subreaper is a property
of the whole process, and the test runner must not become one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import REPO

_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    from daemon import children

    children.become_subreaper()
    # Ours: exits 3 at once, before anyone waits for it.
    ours = children.spawn(lambda: subprocess.Popen(["/bin/sh", "-c", "exit 3"]))
    # An orphan: the shell exits, its background sleep is re-parented to us.
    middle = subprocess.Popen(["/bin/sh", "-c", "/bin/sleep 0.3 & echo $!"],
                              stdout=subprocess.PIPE)
    orphan = int(middle.communicate()[0])
    reaped = []
    deadline = time.monotonic() + 30
    while orphan not in reaped and time.monotonic() < deadline:
        reaped += children.reap_orphans()
        time.sleep(0.01)
    print(orphan in reaped, ours.wait(), sep=" ")
""")


def _run(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_an_orphan_is_reaped_and_our_child_keeps_its_exit_status() -> None:
    # The middle shell is not spawned through children.spawn: its Popen
    # reaps it in communicate(), and the reaper may have reaped it first; its
    # status is not looked at. The one that is ("ours") must keep its 3.
    assert _run(_SCRIPT) == "True 3"


def test_without_the_subreaper_the_orphan_never_comes() -> None:
    """The control: without prctl, the orphan goes to init and reap_orphans never sees it."""
    script = _SCRIPT.replace("children.become_subreaper()", "").replace(
        "time.monotonic() + 30", "time.monotonic() + 1")
    assert _run(script) == "False 3"
