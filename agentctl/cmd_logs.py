"""`agentctl logs`: an agent's captured output, the tail or as it is written."""

from __future__ import annotations

import sys
from typing import TextIO

import click

from agentctl.context import (
    Settings,
    json_line,
    json_option,
    pass_settings,
    raw_option,
    socket_option,
)
from agentctl.params import SIZE
from agentctl.safetext import StreamEscaper
from agentctl.streaming import Printed, stream_output

DEFAULT_TAIL = 64 * 1024


class _Output:
    """Where one of the agent's streams is printed: its bytes, escaped for a terminal."""

    def __init__(self, out: TextIO, *, escape: bool) -> None:
        self._buffer = out.buffer
        # One escaper per agent stream: a character split across two chunks of
        # stdout must not be joined with a chunk of stderr in between.
        self._escaper = StreamEscaper(out.encoding or "utf-8") if escape else None

    def write(self, data: bytes) -> None:
        self._buffer.write(data if self._escaper is None else self._escaper.feed(data))
        self._buffer.flush()

    def end(self) -> None:
        """Print what the escaper still holds: an unfinished character at the very end."""
        if self._escaper is not None:
            self._buffer.write(self._escaper.end())
            self._buffer.flush()


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
@raw_option
@pass_settings
def logs(settings: Settings, *, name: str, follow: bool, tail_bytes: int,
         only: str | None) -> None:
    """Print the output agent NAME wrote: the end of it, then with -f what follows.

    Like `docker logs`, the agent's stdout goes to stdout and its stderr to
    stderr; with --stdout or --stderr, that one stream goes to stdout. The
    daemon keeps at most twice its log cap of each stream.

    On a terminal, control characters are shown escaped (\\x1b, \\r), as are
    bytes that are not UTF-8 (\\xff); lines and tabs are kept. Into a pipe
    or a file, or with --raw, the bytes are printed as the agent wrote them.

    With --json: one JSON object per chunk, {"stream": ..., "text": ...},
    the text decoded as UTF-8 with invalid bytes replaced.
    """
    # Looked up now, not at import: CliRunner swaps sys.stdout for its own.
    streams: dict[str, TextIO] = {"stdout": sys.stdout, "stderr": sys.stderr}
    if only is not None:
        streams = {only: streams["stdout"]}
    outs = {stream: _Output(out, escape=settings.escapes(out)) for stream, out in streams.items()}
    printed = Printed()
    chunks = settings.client().logs(name, follow=follow, tail_bytes=tail_bytes)
    try:
        with stream_output(printed):
            for chunk in chunks:
                out = outs.get(chunk.stream)
                if out is None:
                    continue
                if settings.json:
                    click.echo(json_line({"stream": chunk.stream,
                                          "text": chunk.data.decode("utf-8", errors="replace")}))
                else:
                    out.write(chunk.data)
                printed.json = settings.json
            if not settings.json:
                for out in outs.values():
                    out.end()
    finally:
        chunks.close()


COMMANDS = (logs,)
