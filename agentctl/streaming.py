"""How a streaming command (events, logs) ends: Ctrl-C, a reader that left, an error."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from agentctl.errors import AgentctlError, Interrupted


@dataclass
class Printed:
    """Whether a JSON result has been printed on stdout yet (set by the command)."""

    json: bool = False


@contextlib.contextmanager
def stream_output(printed: Printed) -> Iterator[None]:
    """Wrap the loop that prints a stream.

    Ctrl-C is the normal way to stop following: exit 130 with no more than
    the status. A reader that left (`agentctl events -f | head`) ends the
    command quietly. An error after JSON lines were printed prints no JSON
    error document, which would break a line reader.
    """
    try:
        yield
    except KeyboardInterrupt:
        err = Interrupted("interrupted")
        err.result_printed = True
        raise err from None
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except AgentctlError as err:
        err.result_printed = printed.json
        raise
