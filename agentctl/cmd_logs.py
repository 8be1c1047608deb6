"""`agentctl logs`: an agent's captured output, the tail or as it is written."""

from __future__ import annotations

import json
import sys
from typing import BinaryIO

import click

from agentctl.context import Settings, json_option, pass_settings, socket_option
from agentctl.params import SIZE
from agentctl.streaming import Printed, stream_output

DEFAULT_TAIL = 64 * 1024


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new output until the agent has ended (or Ctrl-C).")
@click.option("--tail", "tail_bytes", type=SIZE, default=DEFAULT_TAIL,
              help="How much of the end of each stream to print first: 64K, 1M... "
                   "[default: 64K]")
@click.option("--stdout", "only", flag_value="stdout", help="Only the agent's stdout.")
@click.option("--stderr", "only", flag_value="stderr", help="Only the agent's stderr.")
@socket_option
@json_option
@pass_settings
def logs(settings: Settings, *, name: str, follow: bool, tail_bytes: int,
         only: str | None) -> None:
    """Print the output agent NAME wrote: the end of it, then with -f what follows.

    The bytes are printed as the agent wrote them (binary-safe). Like
    `docker logs`, the agent's stdout goes to stdout and its stderr to
    stderr; with --stdout or --stderr, that one stream goes to stdout. The
    daemon keeps at most twice its log cap of each stream.

    With --json: one JSON object per chunk, {"stream": ..., "text": ...},
    the text decoded as UTF-8 with invalid bytes replaced.
    """
    # Looked up now, not at import: CliRunner swaps sys.stdout for its own.
    outs: dict[str, BinaryIO] = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    if only is not None:
        outs = {only: outs["stdout"]}
    printed = Printed()
    chunks = settings.client().logs(name, follow=follow, tail_bytes=tail_bytes)
    try:
        with stream_output(printed):
            for chunk in chunks:
                out = outs.get(chunk.stream)
                if out is None:
                    continue
                if settings.json:
                    line = json.dumps({"stream": chunk.stream,
                                       "text": chunk.data.decode("utf-8", errors="replace")})
                    click.echo(line)
                else:
                    out.write(chunk.data)
                    out.flush()
                printed.json = settings.json
    finally:
        chunks.close()


COMMANDS = (logs,)
