"""`agentctl run`'s sandbox options: a policy by name, and overrides of single settings.

Anything looser than the daemon's default profile (host network, a writable
or extra bind, more memory, pids, open files or scratch, a named user where
the default is dynamic, environment beyond the allowlist) is refused unless
an admin signs the run with a --reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from agentd.v1 import agentd_pb2

from agentctl.params import SIZE

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class SandboxOptions:
    policy: str
    network: str | None
    bind_ro: tuple[str, ...]
    bind_rw: tuple[str, ...]
    scratch: int | None
    nofile: int | None
    pin: str | None
    env: tuple[str, ...]
    allow: tuple[str, ...] = ()
    egress_byte_cap: int | None = None

    def fill(self, run: agentd_pb2.RunAction) -> None:
        """Write the policy name and overrides into a RunAction."""
        run.policy = self.policy
        o = run.overrides
        if self.network is not None:
            o.network = self.network
        o.bind_ro.extend(self.bind_ro)
        o.bind_rw.extend(self.bind_rw)
        if self.scratch is not None:
            o.scratch_bytes = self.scratch
        if self.nofile is not None:
            o.nofile = self.nofile
        if self.pin is not None:
            o.entrypoint_sha256 = self.pin.lower()
        o.env.extend(self.env)
        o.allow.extend(self.allow)
        if self.egress_byte_cap is not None:
            o.egress_byte_cap = self.egress_byte_cap


def _pin(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _SHA256.match(value):
        raise click.BadParameter("must be a sha256: 64 hex digits")
    return value


def _env(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        if "=" not in item or item.startswith("="):
            raise click.BadParameter(f"{item!r} is not NAME=VALUE")
    return value


def sandbox_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the sandbox options of `run`; the command gets them as ``sandbox: SandboxOptions``."""

    @functools.wraps(f)
    def collect(*args: Any, policy: str, network: str | None, bind_ro: tuple[str, ...],
                bind_rw: tuple[str, ...], scratch: int | None, nofile: int | None,
                pin: str | None, env: tuple[str, ...], allow: tuple[str, ...],
                egress_byte_cap: int | None, **kwargs: Any) -> Any:
        return f(*args, sandbox=SandboxOptions(policy, network, bind_ro, bind_rw, scratch,
                                               nofile, pin, env, allow, egress_byte_cap),
                 **kwargs)

    options = [
        click.option("--policy", default="", metavar="NAME",
                     help="Sandbox profile (NAME.toml in the daemon's policy directory) "
                          "[default: the daemon's default profile]."),
        click.option("--network", type=click.Choice(["none", "allowlist", "host"]),
                     help="none: loopback only; allowlist: only what --allow and the "
                          "profile name, through agentd's proxy; host: the host's "
                          "network (admin)."),
        click.option("--allow", multiple=True, metavar="HOST:PORT",
                     help="Let the agent reach HOST:PORT, *.DOMAIN:PORT or CIDR:PORT "
                          "(repeatable; implies --network allowlist; beyond the default "
                          "profile's allowlist needs admin)."),
        click.option("--egress-byte-cap", type=SIZE,
                     help="allowlist: close the agent's flows after this many bytes "
                          "in and out (100M, 1G...)."),
        click.option("--bind-ro", multiple=True, metavar="PATH",
                     help="Show host PATH read-only at the same path (repeatable)."),
        click.option("--bind-rw", multiple=True, metavar="PATH",
                     help="Show host PATH writable at the same path (repeatable; admin)."),
        click.option("--scratch", type=SIZE, help="Size cap of /scratch: 256M, 1G..."),
        click.option("--nofile", type=click.IntRange(16, _UINT32_MAX), help="Open files."),
        click.option("--pin", metavar="SHA256", callback=_pin,
                     help="Refuse to launch unless CMD's file hashes to this sha256."),
        click.option("--env", multiple=True, metavar="NAME=VALUE", callback=_env,
                     help="Set a variable for the agent (repeatable; names outside the "
                          "profile's env_allow need admin)."),
    ]
    wrapped: Callable[..., Any] = collect
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped
