"""``agentctl audit verify``: check the audit log's hash chain against a head.

Without PATH, the daemon names its log and its head (Info); with PATH, the
head comes from --head-file or PATH.head. Without any head, removal of whole
trailing records cannot be detected, and the output says so.
"""

from __future__ import annotations

from pathlib import Path

import click
from agentd import auditchain

from agentctl.context import (
    Settings,
    emit_json,
    json_option,
    pass_settings,
    raw_option,
    socket_option,
)
from agentctl.errors import AgentctlError, AuditBroken


@click.group()
@json_option
def audit() -> None:
    """Check the daemon's tamper-evident audit log."""


@audit.command("verify")
@click.argument("path", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--head-file", type=click.Path(path_type=Path, dir_okay=False),
    help="Head to check against [default: PATH.head; without PATH, the daemon's].",
)
@socket_option
@json_option
@raw_option
@pass_settings
def verify(settings: Settings, path: Path | None, head_file: Path | None) -> None:
    """Verify the daemon's audit log, or the one at PATH.

    Exits 10 if any record was edited, deleted, reordered or cut off.
    """
    expected: tuple[int, str] | None = None
    source: str | None = None
    if head_file is not None:
        expected, source = _read_head(head_file, explicit=True), str(head_file)
    if path is None:
        info = settings.client().info()
        path = Path(info.audit_log)
        if expected is None:
            expected = (info.audit_records - 1, info.audit_head or auditchain.GENESIS)
            source = f"agentd at {settings.socket}"
    elif expected is None and auditchain.head_path(path).exists():
        head = auditchain.head_path(path)
        expected, source = _read_head(head, explicit=False), str(head)
    try:
        report = auditchain.verify(path, expected_head=expected)
    except OSError as err:
        hint = " (try sudo)" if isinstance(err, PermissionError) else ""
        raise AgentctlError(f"cannot read audit log {path}: {err.strerror}{hint}") from err

    if settings.json:
        emit_json(
            {
                "path": str(path),
                "ok": report.ok,
                "records": report.records,
                "head": report.head,
                "last_seq": report.last_seq,
                "expected_head": (
                    {"seq": expected[0], "sha256": expected[1], "source": source}
                    if expected else None
                ),
                "beyond_head": report.beyond_head,
                "problems": report.problems,
            }
        )
    elif report.ok:
        click.echo(f"audit log OK: {report.records} records, head {report.head}")
        _notes(settings, path, expected, report)
    else:
        # The path may be the daemon's answer; a problem may quote the log.
        shown = settings.shown_text
        click.echo(shown(f"audit log {path} FAILED verification "
                         f"({len(report.problems)} problems):"))
        for problem in report.problems:
            click.echo(shown(f"  {problem}"))
    if not report.ok:
        broken = AuditBroken(
            f"audit log {path} failed verification: {len(report.problems)} problems"
        )
        broken.result_printed = True
        raise broken


def _notes(settings: Settings, path: Path, expected: tuple[int, str] | None,
           report: auditchain.VerifyReport) -> None:
    """Say, on stderr, what an OK cannot vouch for."""
    if expected is None:
        click.echo(
            settings.shown_text(
                f"note: no head to check against (no {auditchain.head_path(path).name}, "
                "no --head-file): removal of trailing records cannot be ruled out", err=True),
            err=True,
        )
    elif report.beyond_head:
        click.echo(
            f"note: {report.beyond_head} records were appended after the head was read; "
            "their chain is intact but the head does not cover them",
            err=True,
        )


def _read_head(path: Path, *, explicit: bool) -> tuple[int, str]:
    try:
        return auditchain.read_head(path)
    except OSError as err:
        raise AgentctlError(f"cannot read head file {path}: {err.strerror}") from err
    except ValueError as err:
        if explicit:
            raise click.BadParameter(str(err), param_hint="'--head-file'") from err
        # The log's own head file, damaged: evidence of tampering, not a usage error.
        raise AuditBroken(str(err)) from err
