"""click parameter types for durations, sizes and CPU limits.

A value that does not parse is a usage error (exit 2) naming the option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import click

from agentctl import format as fmt

T = TypeVar("T")


class Parsed(click.ParamType[T], Generic[T]):
    """A parameter type whose conversion is one of agentctl.format's parsers."""

    def __init__(self, name: str, parse: Callable[[str], T], kind: type[T]) -> None:
        self.name = name
        self._parse = parse
        self._kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> T:
        if isinstance(value, self._kind) and not isinstance(value, str):
            return value  # already converted, e.g. a default given as a number
        try:
            return self._parse(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


DURATION = Parsed("duration", fmt.parse_duration, float)
"""``500ms``, ``5s``, ``2m``, ``1h``: converts to seconds."""
SIZE = Parsed("size", fmt.parse_size, int)
"""``64K``, ``512M``, ``1G`` or bytes: converts to bytes."""
CPUS = Parsed("cpus", fmt.parse_cpus, int)
"""``0.5`` or ``500m``: converts to thousandths of a CPU."""
