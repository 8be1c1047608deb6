"""agentctl loads a command's module only when that command runs."""

from __future__ import annotations

import subprocess
import sys

import click

from agentctl.cli import COMMAND_MODULES, cli
from tests.harness import REPO

# What `agentctl kill` must not import: none of it is on the stop path.
NOT_ON_THE_KILL_PATH = ("agentctl.cmd_audit", "agentctl.cmd_keys", "agentctl.cmd_monitor",
                        "agentctl.cmd_events", "agentctl.cmd_logs", "agentctl.cmd_failsafe",
                        "agentd.auditchain", "agentctl.keygen")


def test_every_command_is_in_the_table_and_its_module() -> None:
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMAND_MODULES)
    for name, module in COMMAND_MODULES.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.callback is not None and command.callback.__module__ == module
    assert cli.get_command(ctx, "no-such-command") is None


def test_the_kill_path_imports_only_what_a_kill_needs() -> None:
    code = ("import sys\n"
            "from agentctl.cli import cli\n"
            "try:\n"
            "    cli.main(['kill', '--help'], standalone_mode=False)\n"
            "except SystemExit:\n"
            "    pass\n"
            f"print(' '.join(m for m in {NOT_ON_THE_KILL_PATH!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True).stdout
    assert out.splitlines()[-1] == ""
