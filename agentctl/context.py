"""What every command shares: the settings from global options, and the options themselves.

``--json`` is accepted on the group and on every subcommand, ``--raw`` on
the group and on every command that prints agent text, ``--socket`` on
every command that talks to the daemon, ``--key`` on every signing command:
an operator typing ``agentctl kill rogue --key ~/.ssh/id_ed25519`` at 3 a.m.
should not be told the option belongs before the command name.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from google.protobuf.message import Message

from agentctl import client as client_mod
from agentctl import safetext
from agentctl.params import DURATION

DEFAULT_SOCKET = Path("/run/agentd/agentd.sock")
DEFAULT_LIFETIME_S = 300.0

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Message)


@dataclass
class Settings:
    """What the global options decided, shared by every command (``ctx.obj``).

    Tests may pass their own (``CliRunner.invoke(cli, ..., obj=Settings(...))``)
    to shorten the connect timeout, fix the clock or stand in a client.
    """

    socket: Path = DEFAULT_SOCKET
    # The emergency socket, for stop, kill, estop and freeze (see stopping()).
    stop_socket: Path | None = None
    key: Path | None = None
    json: bool = False
    raw: bool = False
    connect_timeout: float = client_mod.CONNECT_TIMEOUT_S
    connect: Callable[..., client_mod.Client] = client_mod.connect
    clock: Callable[[], float] = time.time
    _client: client_mod.Client | None = field(default=None, repr=False)

    def client(self) -> client_mod.Client:
        """The daemon client, connected on first use."""
        if self._client is None:
            self._client = self.connect(self.socket, connect_timeout=self.connect_timeout)
        return self._client

    def stopping(self) -> None:
        """Called by stop, kill, estop and freeze: talk to the emergency socket, if set.

        The daemon serves those commands (and info, for the audience) there
        too, behind a group of its own, where a flood of the control socket
        cannot reach.
        """
        if self.stop_socket is not None and self._client is None:
            self.socket = self.stop_socket

    def now(self) -> datetime:
        """The current time, from :attr:`clock`, in UTC."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def escapes(self, stream: IO[Any]) -> bool:
        """Whether agent text bound for *stream* is escaped: on a terminal, unless --raw."""
        return not self.raw and safetext.is_terminal(stream)

    def shown(self, msg: M) -> M:
        """A daemon answer fit to print on stdout: every string escaped if it is a terminal.

        Everything in an answer may come from an agent (its command lines,
        files, addresses, output excerpts in events) or be steered by one;
        render functions print whatever they pick from the result.
        """
        return safetext.escape_message(msg) if self.escapes(sys.stdout) else msg

    def shown_text(self, text: str, *, err: bool = False) -> str:
        """*text* fit to print on stdout (or stderr, *err*): escaped if it is a terminal."""
        return safetext.escape(text) if self.escapes(sys.stderr if err else sys.stdout) else text

    def close(self) -> None:
        """Close the client, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None


pass_settings = click.make_pass_decorator(Settings, ensure=True)


@dataclass(frozen=True)
class SignOptions:
    """The options of a signed command (see :func:`signing_options`)."""

    reason: str
    lifetime_s: float
    sign_only: bool
    audience: str | None


# ensure_ascii: JSON escapes C0 controls itself, but not C1 controls nor
# bidi characters (U+009B, U+202E), which an agent may have put in any
# string; as \uXXXX they are inert on a terminal and the same text to a parser.
def emit_json(obj: Any) -> None:
    """Print *obj* as one JSON document on stdout, ASCII only."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True))


def json_line(obj: Any) -> str:
    """*obj* as one line of JSON, ASCII only (for streams: one object per line)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=True)


def _store(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """A callback that stores an option given to a subcommand in Settings."""

    def store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(ctx.ensure_object(Settings), attr, value)

    return store


def json_option(f: F) -> F:
    """``--json`` on a subcommand."""
    return click.option(
        "--json", is_flag=True, expose_value=False, callback=_store("json"),
        help="Print the result as JSON.",
    )(f)


def raw_option(f: F) -> F:
    """``--raw`` on a subcommand that prints what an agent controls."""
    return click.option(
        "--raw", is_flag=True, expose_value=False, callback=_store("raw"),
        help="Print agent text as it is, control characters included, even on a terminal.",
    )(f)


def socket_option(f: F) -> F:
    """``--socket`` on a subcommand that talks to the daemon."""
    return click.option(
        "--socket", type=click.Path(path_type=Path), expose_value=False,
        callback=_store("socket"), help="agentd's control socket (as the global option).",
    )(f)


def key_option(f: F) -> F:
    """``--key`` on a signing subcommand."""
    return click.option(
        "--key", type=click.Path(path_type=Path, dir_okay=False), expose_value=False,
        callback=_store("key"), help="Private key to sign with (as the global option).",
    )(f)


def signing_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options of a signed command; the command gets them as ``sign: SignOptions``."""

    @functools.wraps(f)
    def collect(
        *args: Any, reason: str, lifetime: float, sign_only: bool, audience: str | None,
        **kwargs: Any,
    ) -> Any:
        return f(*args, sign=SignOptions(reason, lifetime, sign_only, audience), **kwargs)

    options = [
        click.option("--reason", default="", help="Why; recorded in the audit log."),
        click.option(
            "--lifetime", type=DURATION, default=DEFAULT_LIFETIME_S,
            help="How long the signed command stays valid [default: 5m].",
        ),
        click.option(
            "--sign-only", is_flag=True,
            help="Print the signed envelope (DSSE JSON) instead of sending it.",
        ),
        click.option(
            "--audience", metavar="HOST_ID",
            help="The daemon's host id; with it, --sign-only needs no daemon (offline).",
        ),
        key_option,
        socket_option,
        json_option,
        raw_option,
    ]
    wrapped: Callable[..., Any] = collect
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped
