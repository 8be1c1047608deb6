"""Fail-closed controls: keepalive (lease renewal), estop, reset, and cosign.

keepalive is what an on-call tool or a control plane runs to hold an agent's
lease; when it stops (or is refused), the daemon kills the agent at the
deadline. estop kills everything and latches; reset clears the latch only,
with as many distinct signers as the daemon requires (cosign adds one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import click
from agentd import signing
from agentd.v1 import agentd_pb2
from google.protobuf.message import DecodeError

from agentctl import format as fmt
from agentctl.cmd_agents import (
    build_envelope,
    report_estop,
    report_renew,
    report_reset,
    run_id_option,
)
from agentctl.context import Settings, SignOptions, pass_settings, signing_options
from agentctl.errors import AgentctlError, DaemonUnreachable, Interrupted, LeaseLost
from agentctl.params import DURATION
from agentctl.signer import load_key

_UINT32_MAX = 2**32 - 1


@click.command()
@click.argument("name")
@click.option("--every", type=DURATION, default=10.0, show_default="10s",
              help="Time between renewals.")
@click.option("--ttl", type=DURATION, default=30.0, show_default="30s",
              help="Each renewal extends the lease to this long from then.")
@click.option("--count", type=click.IntRange(min=1), hidden=True,
              help="Stop after this many renewals (for tests and scripts).")
@run_id_option
@signing_options
@pass_settings
def keepalive(settings: Settings, *, name: str, every: float, ttl: float, count: int | None,
              run_id: str, sign: SignOptions) -> None:
    """Renew agent NAME's lease every --every until interrupted (signed, each renewal fresh).

    Every renewal names the run it started on (--id, or NAME's run when it
    starts): if NAME is restarted, the new run is never renewed by this loop.
    Exits non-zero, loudly, the moment a renewal is refused: the agent will
    then be killed when its lease runs out. A daemon that cannot be reached
    is retried until the lease would have run out.
    """
    if every >= ttl:
        raise click.BadParameter("must be shorter than --ttl, or the lease lapses between "
                                 "renewals", param_hint="'--every'")
    if sign.sign_only:
        raise click.BadParameter("keepalive signs a fresh command for every renewal; use "
                                 "'agentctl renew NAME --id RUN_ID --sign-only' for one "
                                 "renewal signed offline",
                                 param_hint="'--sign-only'")
    load_key(settings.key)  # fail before the loop if the key is missing
    ttl_ms = round(ttl * 1000)
    lease_ends = time.monotonic() + ttl  # what we know of it before the first renewal
    renewals = 0
    pinned = run_id  # looked up once, on the first pass that reaches the daemon
    try:
        while True:
            try:
                if not pinned:
                    # A loop that outlives the run it was started for must
                    # not keep a later run of the same name alive.
                    pinned = settings.client().get_agent(name).id
                env = build_envelope(settings, sign, _renewal(name, pinned, ttl_ms))
                assert env is not None
                result = settings.client().renew(env)
            except DaemonUnreachable as err:
                if time.monotonic() >= lease_ends:
                    raise LeaseLost(f"could not renew the lease of '{name}' before it ran out "
                                    f"({err.message}); the daemon will have killed it") from err
                warning = (f"agentctl: warning: {err.message}; retrying in "
                           f"{fmt.format_duration(every)}")
                click.echo(settings.shown_text(warning, err=True), err=True)
            except AgentctlError as err:
                run = f" (run {pinned})" if pinned else ""
                raise LeaseLost(
                    f"RENEWAL REFUSED for '{name}'{run}: {err.message} -- the agent will be "
                    "killed when its lease runs out") from err
            else:
                lease_ends = time.monotonic() + result.remaining_ms / 1000
                renewals += 1
                report_renew(settings, result)
                if count is not None and renewals >= count:
                    return
            time.sleep(every)
    except KeyboardInterrupt:
        left = max(0.0, lease_ends - time.monotonic())
        raise Interrupted(f"keepalive stopped: the lease of '{name}' runs out in {left:.1f}s, "
                          "and then the agent is killed") from None


@click.command()
@click.argument("name")
@click.option("--ttl", type=DURATION, default=30.0, show_default="30s",
              help="The lease runs this long from when the daemon accepts the renewal.")
@run_id_option
@signing_options
@pass_settings
def renew(settings: Settings, *, name: str, ttl: float, run_id: str, sign: SignOptions) -> None:
    """Renew agent NAME's lease once (signed); --sign-only --id prepares one for later."""
    if not 0 < round(ttl * 1000) <= _UINT32_MAX:
        raise click.BadParameter("must be between 1ms and 49 days", param_hint="'--ttl'")

    env = build_envelope(settings, sign, _renewal(name, run_id, round(ttl * 1000)))
    if env is not None:
        report_renew(settings, settings.client().renew(env))


def _renewal(name: str, run_id: str, ttl_ms: int) -> Callable[[agentd_pb2.Command], None]:
    def action(cmd: agentd_pb2.Command) -> None:
        cmd.renew.name, cmd.renew.id, cmd.renew.ttl_ms = name, run_id, ttl_ms

    return action


@click.command()
@signing_options
@pass_settings
def estop(settings: Settings, *, sign: SignOptions) -> None:
    """Kill EVERY agent on the host at once, then refuse all runs until a reset (signed)."""
    settings.stopping()

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.estop.SetInParent()

    env = build_envelope(settings, sign, action)
    if env is not None:
        report_estop(settings, settings.client().estop(env))


@click.command()
@signing_options
@pass_settings
def reset(settings: Settings, *, sign: SignOptions) -> None:
    """Clear the emergency-stop latch; restarts nothing (signed by M principals).

    When the daemon needs more than one signer: 'agentctl reset --sign-only >
    reset.env', then 'agentctl cosign reset.env --key OTHER' for each other
    principal, then 'agentctl send reset.env'.
    """

    def action(cmd: agentd_pb2.Command) -> None:
        cmd.reset.SetInParent()

    env = build_envelope(settings, sign, action)
    if env is not None:
        report_reset(settings, settings.client().reset(env))


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--key", "cosign_key", type=click.Path(path_type=Path, dir_okay=False),
              help="The co-signer's private key [default: --key / AGENTCTL_KEY].")
@pass_settings
def cosign(settings: Settings, *, file: Path, cosign_key: Path | None) -> None:
    """Add a signature to the signed command in FILE (in place), after showing what it says."""
    key = load_key(cosign_key or settings.key)
    try:
        env = signing.envelope_from_json(file.read_text(encoding="utf-8"))
        cmd = agentd_pb2.Command.FromString(env.payload)
    except (ValueError, DecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"not a signed agentd command: {err}", param_hint="FILE") from err
    # The co-signer must see what they vouch for. These are the signed bytes,
    # decoded; the daemon checks every signature over exactly them. Whoever
    # wrote the file chose the name: a control character could hide the rest.
    expires = cmd.expires_at.ToDatetime()
    click.echo(settings.shown_text(
        f"co-signing: {cmd.WhichOneof('action')} {_target(cmd)} for host {cmd.audience!r}, "
        f"reason {cmd.reason!r}, expires {expires:%Y-%m-%d %H:%M:%S}Z", err=True), err=True)
    try:
        env = signing.cosign(env, key)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--key'") from err
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(signing.envelope_to_json(env) + "\n", encoding="utf-8")
    os.replace(tmp, file)
    click.echo(f"{file}: now {len(env.signatures)} signature(s)")


def _target(cmd: agentd_pb2.Command) -> str:
    action = cmd.WhichOneof("action")
    body = getattr(cmd, action or "", None) if action else None
    name = getattr(body, "name", "")
    run_id = getattr(body, "id", "")
    if name:
        return f"'{name}' (run {run_id!r})" if run_id else f"'{name}'"
    return "(all agents)" if action in ("estop", "reset") else ""


COMMANDS = (keepalive, renew, estop, reset, cosign)
