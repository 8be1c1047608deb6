"""Watching agents: ``top``, a live table of what the kernel says every agent is doing.

The numbers are the daemon's samples of cgroupfs and /proc (see
daemon.monitor.sampler), never the agents' own reports.
"""

from __future__ import annotations

import sys
import time

import click

from agentctl import format as fmt
from agentctl import render, safetext
from agentctl.context import (
    Settings,
    emit_json,
    json_option,
    pass_settings,
    raw_option,
    socket_option,
)
from agentctl.params import DURATION

# ANSI: cursor home, clear screen (ECMA-48 CUP and ED).
_CLEAR = "\x1b[H\x1b[2J"
_MIN_INTERVAL_S = 0.1


@click.command()
@click.option("--interval", type=DURATION, default=1.0,
              help="Time between refreshes: 500ms, 1s, 5s [default: 1s].")
@click.option("--once", is_flag=True, help="Print one table and exit (for scripts).")
@click.option("-n", "--count", type=click.IntRange(min=1), metavar="N",
              help="Exit after N tables [default: run until Ctrl-C].")
@socket_option
@json_option
@raw_option
@pass_settings
def top(settings: Settings, *, interval: float, once: bool, count: int | None) -> None:
    """Show a live table of every agent: processes, CPU, memory, sockets, OOM kills.

    Redrawn in place on a terminal; successive tables otherwise. With
    --json, prints one snapshot and exits. Ctrl-C quits.
    """
    if interval < _MIN_INTERVAL_S:
        raise click.BadParameter("must be at least 100ms", param_hint="'--interval'")
    client = settings.client()
    if settings.json:
        agents = client.list_agents()
        emit_json({
            "at": settings.now().isoformat(),
            "agents": [
                {"name": a.name, "id": a.id, "state": render.state_name(a.state),
                 "pids": len(a.pids), "memory_bytes": a.memory_bytes,
                 "signals": render.to_dict(a.signals)}
                for a in agents
            ],
        })
        return
    limit = 1 if once else count
    tty = safetext.is_terminal(sys.stdout)
    shown = 0
    try:
        while True:
            agents = [settings.shown(a) for a in client.list_agents()]
            now = settings.now()
            body = render.top_table(agents, now) if agents else "no agents"
            head = (f"agentd top: {len(agents)} agent(s) at {now:%H:%M:%S}Z, "
                    f"every {fmt.format_duration(interval)}")
            if tty and limit != 1:
                click.echo(_CLEAR + head + " (Ctrl-C to quit)\n\n" + body)
            elif limit == 1:
                click.echo(body)
            else:
                click.echo(head + "\n" + body + "\n")
            shown += 1
            if limit is not None and shown >= limit:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        # Quitting a read-only view is not an error.
        return


COMMANDS = (top,)
