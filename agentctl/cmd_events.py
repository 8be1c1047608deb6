"""`agentctl events`: what the daemon did and refused, recent or as it happens."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import click
from agentd.v1 import agentd_pb2

from agentctl.context import (
    Settings,
    json_line,
    json_option,
    pass_settings,
    raw_option,
    socket_option,
)
from agentctl.render import to_dict
from agentctl.streaming import Printed, stream_output

DEFAULT_BACKLOG = 50
MAX_BACKLOG = 10_000  # the daemon keeps this many


def event_line(ev: agentd_pb2.Event) -> str:
    """One line for people: ``2026-11-23 16:24:18Z  command   accepted kill rogue by alice``.

    The message may quote an agent (a tripwire's excerpt, a detector's
    reason): pass the event through Settings.shown first.
    """
    when = ev.at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{when}  {ev.kind:<9} {ev.message}"


def event_dict(ev: agentd_pb2.Event) -> dict[str, Any]:
    """The event for --json: the proto's fields, with the audit record parsed as ``fields``."""
    d = to_dict(ev)
    raw = d.pop("fields_json", "") or "{}"
    try:
        d["fields"] = json.loads(raw)
    except ValueError:
        d["fields"] = {"unparsed": raw}
    return d


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option(
    "--backlog", type=click.IntRange(0, MAX_BACKLOG), default=DEFAULT_BACKLOG,
    show_default=True, help="How many recent events to print first.",
)
@click.option("--agent", metavar="NAME", default="",
              help="Only events of this agent (its name or id).")
@socket_option
@json_option
@raw_option
@pass_settings
def events(settings: Settings, *, follow: bool, backlog: int, agent: str) -> None:
    """Print the daemon's recent events; with -f, new ones as they happen.

    Kinds: lifecycle (agents ending, daemon start and stop), command (signed
    commands accepted or refused, and their results), rule (tripwires,
    detector verdicts), watchdog (lease expiries, the guardian, a broken
    audit chain), daemon (anything else). Every event is a record of the
    audit log; the daemon keeps the last 10,000 in memory. A reader too slow
    to keep up sees an events_dropped event saying how many it missed.

    With --json: one JSON object per line, the audit record under "fields".
    """
    printed = Printed()
    stream = settings.client().events(follow=follow, backlog=backlog, agent=agent)
    try:
        with stream_output(printed):
            for ev in stream:
                if settings.json:
                    click.echo(json_line(event_dict(ev)))
                else:
                    click.echo(event_line(settings.shown(ev)))
                printed.json = True
    finally:
        stream.close()


COMMANDS = (events,)
