"""``agentctl keygen``: create an operator's signing key."""

from __future__ import annotations

from pathlib import Path

import click

from agentctl import keygen as keygen_mod
from agentctl.context import Settings, emit_json, json_option, pass_settings


@click.command()
@click.option(
    "--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
    help="Where to write the private key; the public key goes to OUT.pub.",
)
@click.option("--comment", "-C", help="Comment on the public key [default: user@host].")
@click.option("--force", is_flag=True, help="Replace existing files.")
@json_option
@pass_settings
def keygen(settings: Settings, out: Path, comment: str | None, force: bool) -> None:
    """Create an Ed25519 signing key (OpenSSH format) and print its trust-store line."""
    pair = keygen_mod.generate(out, comment or keygen_mod.default_comment(), force=force)
    if settings.json:
        emit_json(
            {
                "private_key": str(pair.private),
                "public_key": str(pair.public),
                "public_key_line": pair.public_line,
                "keyid": pair.keyid,
                "trust_store_line": pair.trust_line,
            }
        )
        return
    click.echo(f"wrote {pair.private} (private key, mode 0600) and {pair.public}")
    click.echo(pair.public_line)
    click.echo(
        f"to trust it, add a line like this to the daemon's trust store "
        f"({keygen_mod.TRUST_STORE}), with the roles it needs "
        f"({','.join(keygen_mod.ROLES)}):"
    )
    click.echo(pair.trust_line)
