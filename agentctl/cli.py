"""The agentctl command line: the group, its global options, and how failures end.

Every failure, whether a usage error, a refusal by the daemon or a bug, ends
as one line on stderr, ``agentctl: error: MESSAGE``, and the exit code of
its error class (the table is in agentctl.errors). With --json, the error
is also printed on stdout as ``{"error": {...}}`` unless the command already
printed its result there.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from agentctl import safetext
from agentctl.context import DEFAULT_SOCKET, Settings, emit_json
from agentctl.errors import AgentctlError, Interrupted

# Command name -> the module that defines it (as an attribute of that name,
# dashes as underscores). A module is imported only when one of its commands
# runs (or --help lists them all): `agentctl kill` loads what a kill needs and
# not the audit verifier, the terminal renderer or the key generator, which
# was most of its start-up (issue 12). tests/unit/test_cli_lazy.py keeps
# this table and the modules in step.
COMMAND_MODULES: dict[str, str] = {
    "keygen": "agentctl.cmd_keys",
    **dict.fromkeys(("info", "ps", "status", "run", "stop", "kill", "freeze", "cut", "thaw",
                     "send"),
                    "agentctl.cmd_agents"),
    **dict.fromkeys(("keepalive", "renew", "estop", "reset", "cosign"), "agentctl.cmd_failsafe"),
    "top": "agentctl.cmd_monitor",
    "events": "agentctl.cmd_events",
    "logs": "agentctl.cmd_logs",
    "audit": "agentctl.cmd_audit",
}


class AgentctlGroup(click.Group):
    """A click group whose every failure is one ``agentctl: error:`` line.

    Its commands are loaded on first use from COMMAND_MODULES.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            module = importlib.import_module(COMMAND_MODULES[cmd_name])
            command = getattr(module, cmd_name.replace("-", "_"))
            if not isinstance(command, click.Command):
                raise TypeError(f"{module.__name__}.{cmd_name} is not a click command")
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def main(  # type: ignore[override]  # click's overloads, one signature here
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the CLI; in standalone mode, report any failure in one line and exit."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as err:
            _fail(err)
        except click.Abort:
            _fail(Interrupted("interrupted: a command already sent may still be carried out"))
        except Exception as err:
            if os.environ.get("AGENTCTL_DEBUG"):
                raise
            _fail(
                AgentctlError(
                    f"internal error: {type(err).__name__}: {err} "
                    "(set AGENTCTL_DEBUG=1 for the traceback)"
                )
            )
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        """Invoke the command; with --json, also print an error as JSON on stdout."""
        try:
            return super().invoke(ctx)
        except click.ClickException as err:
            settings = ctx.find_object(Settings)
            if settings is not None and settings.json and not getattr(err, "result_printed", 0):
                emit_json(
                    {
                        "error": {
                            "message": _one_line(err),
                            "exit_code": err.exit_code,
                            "status": getattr(err, "status", None),
                        }
                    }
                )
            raise


def _one_line(err: click.ClickException) -> str:
    message = " ".join(err.format_message().split())
    if isinstance(err, click.UsageError) and err.ctx is not None:
        message += f" (see '{err.ctx.command_path} --help')"
    return message


def _fail(err: click.ClickException) -> NoReturn:
    # The daemon's reasons name agents, paths and commands an agent may have
    # chosen. Escaped on a terminal even with --raw: an error is read, not parsed.
    line = f"agentctl: error: {_one_line(err)}"
    click.echo(safetext.escape(line) if safetext.is_terminal(sys.stderr) else line, err=True)
    sys.exit(err.exit_code)


@click.group(
    "agentctl", cls=AgentctlGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--socket", type=click.Path(path_type=Path), envvar="AGENTD_SOCKET",
    default=DEFAULT_SOCKET, show_default=True, show_envvar=True,
    help="agentd's control socket.",
)
@click.option(
    "--stop-socket", type=click.Path(path_type=Path), envvar="AGENTD_STOP_SOCKET",
    show_envvar=True,
    help="agentd's emergency socket (/run/agentd-stop/stop.sock): stop, kill, estop and "
    "freeze go there instead, where nothing reaching the control socket can delay them.",
)
@click.option(
    "--key", type=click.Path(path_type=Path, dir_okay=False), envvar="AGENTCTL_KEY",
    show_envvar=True,
    help="Ed25519 private key (OpenSSH or PEM) for signed commands; its passphrase "
    "comes from $AGENTCTL_KEY_PASSPHRASE or a prompt.",
)
@click.option("--json", "json_output", is_flag=True, help="Print results as JSON.")
@click.option(
    "--raw", "raw_output", is_flag=True,
    help="Print agent text as it is, control characters included, even on a terminal "
    "(by default a terminal gets them escaped: \\x1b, \\r).",
)
@click.version_option(package_name="agentd", prog_name="agentctl")
@click.pass_context
def cli(
    ctx: click.Context, *, socket: Path, stop_socket: Path | None, key: Path | None,
    json_output: bool, raw_output: bool
) -> None:
    """Control agentd, the kill switch for AI agents.

    To end an agent now: agentctl --key KEY kill NAME
    """
    settings = ctx.ensure_object(Settings)
    settings.socket, settings.key, settings.json = socket, key, json_output
    settings.stop_socket = stop_socket
    settings.raw = raw_output
    ctx.call_on_close(settings.close)


def main() -> None:
    """The ``agentctl`` entry point."""
    cli(prog_name="agentctl")
