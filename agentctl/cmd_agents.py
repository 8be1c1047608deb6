"""Commands about agents: info, ps, status, and the signed run, stop, kill and send.

Signed commands load the key first (so a missing key is reported before the
daemon is contacted), take the audience from --audience or the daemon's
Info, and with --sign-only print the envelope instead of sending it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO

import click
from agentd import signing
from agentd.v1 import agentd_pb2
from google.protobuf.message import DecodeError

from agentctl import format as fmt
from agentctl import render
from agentctl.context import (
    Settings,
    SignOptions,
    emit_json,
    json_option,
    pass_settings,
    raw_option,
    signing_options,
    socket_option,
)
from agentctl.errors import KillIncomplete
from agentctl.params import CPUS, DURATION, SIZE
from agentctl.sandbox_opts import SandboxOptions, sandbox_options
from agentctl.signer import load_key

_UINT32_MAX = 2**32 - 1

# Not on by default: a kill by name alone must end whatever runs under that
# name now (the on-call path stays one argument). The pin is for commands
# signed ahead of time, or sent again and again (keepalive).
run_id_option = click.option(
    "--id", "run_id", default="", metavar="RUN_ID",
    help="Act only on this run of NAME (its id, from 'agentctl ps'); refused if NAME "
         "has been restarted since.",
)


# -------------------------------------------------------------- read-only
@click.command()
@socket_option
@json_option
@raw_option
@pass_settings
def info(settings: Settings) -> None:
    """Show the daemon's host id (the audience), limits and audit head."""
    resp = settings.client().info()
    if settings.json:
        emit_json(render.to_dict(resp))
    else:
        click.echo(render.info_text(settings.shown(resp), settings.now()))


@click.command()
@socket_option
@json_option
@raw_option
@pass_settings
def ps(settings: Settings) -> None:
    """List agents: name, state, process count, memory, uptime, user, id."""
    agents = settings.client().list_agents()
    if settings.json:
        emit_json({"agents": [render.to_dict(a) for a in agents]})
    elif not agents:
        click.echo("no agents")
    else:
        click.echo(render.agents_table([settings.shown(a) for a in agents], settings.now()))


@click.command()
@click.argument("name")
@socket_option
@json_option
@raw_option
@pass_settings
def status(settings: Settings, name: str) -> None:
    """Show everything the daemon knows about agent NAME."""
    _print_agent(settings, settings.client().get_agent(name))


# ----------------------------------------------------------------- signed
@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--name", required=True, help="The agent's name, unique on this host.")
@click.option("--user", default="", help="User to run as [default: the daemon's agent user].")
@click.option("--memory", type=SIZE, help="Memory limit: 512M, 1G, 64K or bytes.")
@click.option("--pids", type=click.IntRange(1, _UINT32_MAX), help="Most processes at once.")
@click.option("--cpus", type=CPUS, help="CPU limit in CPUs: 0.5, 2 or 500m.")
@click.option("--lease", type=DURATION,
              help="Dead-man's switch: killed unless renewed within this time "
                   "(agentctl keepalive) [default: the daemon's].")
@click.option("--max-runtime", type=DURATION, help="Stopped when it has run this long.")
@sandbox_options
@signing_options
@click.argument("argv", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@pass_settings
def run(
    settings: Settings, *, name: str, user: str, memory: int | None, pids: int | None,
    cpus: int | None, lease: float | None, max_runtime: float | None, argv: tuple[str, ...],
    sign: SignOptions, sandbox: SandboxOptions,
) -> None:
    """Launch CMD as agent NAME in its own cgroup and sandbox (signed).

    The sandbox starts from nothing: the daemon's policy grants what the agent
    gets; anything looser than the default profile needs an admin's signature
    and --reason.
    """
    if lease is not None and not 0 < round(lease * 1000) <= _UINT32_MAX:
        raise click.BadParameter("must be between 1ms and 49 days", param_hint="'--lease'")

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.run.name, cmd.run.user = name, user
        cmd.run.argv.extend(argv)
        cmd.run.resources.memory_bytes = memory or 0
        cmd.run.resources.pids_max = pids or 0
        cmd.run.resources.cpu_millis = cpus or 0
        if lease is not None:
            cmd.run.lease_ms = round(lease * 1000)
        if max_runtime is not None:
            cmd.run.max_runtime_ms = round(max_runtime * 1000)
        sandbox.fill(cmd.run)

    env = build_envelope(settings, sign, action)
    if env is not None:
        _print_agent(settings, settings.client().run(env))


@click.command()
@click.argument("name")
@click.option("--grace", type=DURATION, help="Time between SIGTERM and the kill [default: 5s].")
@run_id_option
@signing_options
@pass_settings
def stop(settings: Settings, *, name: str, grace: float | None, run_id: str,
         sign: SignOptions) -> None:
    """SIGTERM agent NAME, wait the grace period, then kill what is left (signed)."""
    settings.stopping()
    if grace is not None and round(grace * 1000) > _UINT32_MAX:
        raise click.BadParameter("too long", param_hint="'--grace'")

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.stop.name, cmd.stop.id = name, run_id
        if grace is not None:
            cmd.stop.grace_ms = round(grace * 1000)

    env = build_envelope(settings, sign, action)
    if env is not None:
        report_kill(settings, settings.client().stop(env, grace), "stop")


@click.command()
@click.argument("name")
@run_id_option
@signing_options
@pass_settings
def kill(settings: Settings, *, name: str, run_id: str, sign: SignOptions) -> None:
    """Kill every process of agent NAME at once, through its cgroup (signed)."""
    settings.stopping()

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.kill.name, cmd.kill.id = name, run_id

    env = build_envelope(settings, sign, action)
    if env is not None:
        report_kill(settings, settings.client().kill(env), "kill")


@click.command()
@click.argument("name")
@run_id_option
@signing_options
@pass_settings
def freeze(settings: Settings, *, name: str, run_id: str, sign: SignOptions) -> None:
    """Freeze every process of agent NAME where it stands (signed); kill stays instant.

    The normal path for a suspicious agent: freeze, inspect (status, logs),
    then kill or thaw.
    """
    settings.stopping()

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.freeze.name, cmd.freeze.id = name, run_id

    env = build_envelope(settings, sign, action)
    if env is not None:
        _print_agent(settings, settings.client().freeze(env))


@click.command()
@click.argument("name")
@run_id_option
@signing_options
@pass_settings
def cut(settings: Settings, *, name: str, run_id: str, sign: SignOptions) -> None:
    """Close every network flow of allowlist agent NAME and empty its allowlist (signed).

    The agent keeps running, with nothing it can reach: its hands are
    taken, the evidence (its processes, files and output) kept.
    """
    settings.stopping()

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.cut.name, cmd.cut.id = name, run_id

    env = build_envelope(settings, sign, action)
    if env is not None:
        _print_agent(settings, settings.client().cut(env))


@click.command()
@click.argument("name")
@run_id_option
@signing_options
@pass_settings
def thaw(settings: Settings, *, name: str, run_id: str, sign: SignOptions) -> None:
    """Let a frozen agent NAME run again (signed; operator or admin)."""

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.thaw.name, cmd.thaw.id = name, run_id

    env = build_envelope(settings, sign, action)
    if env is not None:
        _print_agent(settings, settings.client().thaw(env))


@click.command()
@click.argument("file", type=click.File("r"), metavar="FILE")
@socket_option
@json_option
@raw_option
@pass_settings
def send(settings: Settings, file: IO[str]) -> None:
    """Send a signed envelope (DSSE JSON, from --sign-only) read from FILE or - (stdin)."""
    try:
        env = signing.envelope_from_json(file.read())
        # Decoded only to choose the RPC: the daemon verifies the signatures
        # over these exact bytes before it believes any of it.
        cmd = agentd_pb2.Command.FromString(env.payload)
    except (ValueError, DecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"not a signed agentd command: {err}", param_hint="FILE") from err
    action = cmd.WhichOneof("action")
    client = settings.client()
    if action == "run":
        _print_agent(settings, client.run(env))
    elif action == "stop":
        grace = cmd.stop.grace_ms / 1000 if cmd.stop.HasField("grace_ms") else None
        report_kill(settings, client.stop(env, grace), "stop")
    elif action == "kill":
        report_kill(settings, client.kill(env), "kill")
    elif action == "renew":
        report_renew(settings, client.renew(env))
    elif action == "estop":
        report_estop(settings, client.estop(env))
    elif action == "reset":
        report_reset(settings, client.reset(env))
    elif action == "freeze":
        _print_agent(settings, client.freeze(env))
    elif action == "thaw":
        _print_agent(settings, client.thaw(env))
    elif action == "cut":
        _print_agent(settings, client.cut(env))
    else:
        raise click.BadParameter("the command holds no action agentd knows", param_hint="FILE")


COMMANDS = (info, ps, status, run, stop, kill, freeze, cut, thaw, send)


# ---------------------------------------------------------------- helpers
def build_envelope(
    settings: Settings, sign: SignOptions, action: Callable[[agentd_pb2.Command], None]
) -> agentd_pb2.Envelope | None:
    """Build and sign a command; print it and return None with --sign-only."""
    key = load_key(settings.key)
    if sign.lifetime_s <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--lifetime'")
    audience = sign.audience
    if audience is None:
        resp = settings.client().info()
        audience = resp.host_id
        limit = resp.max_command_lifetime_s
        if limit and sign.lifetime_s > limit:
            raise click.BadParameter(
                f"{fmt.format_duration(sign.lifetime_s)} is longer than the daemon accepts "
                f"({fmt.format_duration(limit)})",
                param_hint="'--lifetime'",
            )
    cmd = signing.new_command(
        audience=audience, reason=sign.reason, now=settings.clock(), lifetime_s=sign.lifetime_s
    )
    action(cmd)
    env = signing.sign_command(cmd, key)
    if sign.sign_only:
        click.echo(signing.envelope_to_json(env))
        return None
    return env


def _print_agent(settings: Settings, agent: agentd_pb2.Agent) -> None:
    if settings.json:
        emit_json(render.to_dict(agent))
    else:
        click.echo(render.agent_text(settings.shown(agent), settings.now()))


def report_kill(settings: Settings, result: agentd_pb2.KillResult, verb: str) -> None:
    """Print a stop or kill result; raise KillIncomplete (exit 8) if processes are stuck."""
    if settings.json:
        emit_json(render.to_dict(result))
    else:
        click.echo(render.kill_text(settings.shown(result), verb))
    if result.audit_pending:
        click.echo(f"warning: {render.AUDIT_PENDING}", err=True)
    if not result.verified_empty:
        pids = " ".join(str(p.pid) for p in result.stuck) or "unknown"
        err = KillIncomplete(
            f"{verb} of '{result.name}' incomplete: processes still present (pids {pids}); "
            "agentd keeps watching them"
        )
        err.result_printed = True
        raise err



def report_renew(settings: Settings, result: agentd_pb2.LeaseResult) -> None:
    if settings.json:
        emit_json(render.to_dict(result))
    else:
        result = settings.shown(result)
        click.echo(f"renewed '{result.name}' (run {result.id}): lease "
                   f"{fmt.format_duration(result.ttl_ms / 1000)}, "
                   f"{result.remaining_ms / 1000:.1f}s left")


def report_estop(settings: Settings, result: agentd_pb2.EstopResult) -> None:
    """Print an estop result; raise KillIncomplete (exit 8) if any cgroup is not empty."""
    if settings.json:
        emit_json(render.to_dict(result))
    else:
        click.echo(render.estop_text(settings.shown(result)))
    if result.audit_pending:
        click.echo(f"warning: {render.AUDIT_PENDING}", err=True)
    if not result.all_verified_empty:
        err = KillIncomplete("emergency stop incomplete: processes still present; "
                             "agentd keeps watching them")
        err.result_printed = True
        raise err


def report_reset(settings: Settings, result: agentd_pb2.ResetResult) -> None:
    if settings.json:
        emit_json(render.to_dict(result))
    else:
        principals = ", ".join(settings.shown(result).principals)
        click.echo(f"emergency-stop latch cleared (signed by {principals}); "
                   "nothing was restarted")
