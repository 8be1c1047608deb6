"""agentctl without agentd: keys, offline signing, parsing, errors, audit verify.

Commands run through click's CliRunner and the real code path, and the
tests assert exact output where an operator reads it. Where a daemon must
answer, a small in-process gRPC server on a real Unix socket stands in
for it (the real daemon's tests live elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
from agentd import signing
from agentd.v1 import agentd_pb2, agentd_pb2_grpc
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp

from agentctl import client as client_mod
from agentctl import format as fmt
from agentctl.cli import cli
from agentctl.client import stop_deadline
from agentctl.context import Settings
from daemon.audit import AuditLog
from daemon.auth import Limits, TrustStore, verify

NOW = 1_750_000_000.0
HOST = "host-test"
UNREACHABLE = (
    "agentctl: error: cannot reach agentd at {}: no such socket "
    "(is the daemon running? set --socket or AGENTD_SOCKET)\n"
)


# ----------------------------------------------------------------- fixtures
@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="actl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """An unencrypted OpenSSH Ed25519 private key, as ssh-keygen writes them."""
    path = tmp_path / "id_ed25519"
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def invoke(
    args: list[str],
    *,
    settings: Settings | None = None,
    env: dict[str, str | None] | None = None,
    input: str | None = None,
) -> Result:
    """Run agentctl with a fixed clock and no AGENTCTL_* or AGENTD_* from the caller."""
    clean: dict[str, str | None] = {
        "AGENTD_SOCKET": None, "AGENTCTL_KEY": None, "AGENTCTL_KEY_PASSPHRASE": None,
        "AGENTCTL_DEBUG": None,
    }
    clean.update(env or {})
    obj = settings or Settings(clock=lambda: NOW, connect_timeout=1.0)
    return CliRunner().invoke(cli, args, obj=obj, env=clean, input=input)


def _envelope(result: Result) -> tuple[agentd_pb2.Envelope, agentd_pb2.Command]:
    assert result.exit_code == 0, result.stderr
    env = signing.envelope_from_json(result.stdout)
    return env, agentd_pb2.Command.FromString(env.payload)


def _assert_signed_by(
    env: agentd_pb2.Envelope, key_path: Path, passphrase: bytes | None = None, *,
    audience: str = "h",
) -> None:
    """Verify the envelope with the daemon's own verify(), trusting only this key.

    The command must carry exactly one signature, by this key, addressed to
    *audience* and valid at the fixed clock NOW.
    """
    key = signing.load_private_key(key_path, passphrase)
    trust = TrustStore.parse(f"signer admin {signing.public_key_line(key, 'signer@test')}\n",
                             "test trust store")
    assert len(env.signatures) == 1
    action = agentd_pb2.Command.FromString(env.payload).WhichOneof("action")
    assert action is not None
    vc = verify(env, trust=trust, audience=audience, expected_action=action, now=NOW,
                limits=Limits())
    assert vc.principals == ("signer",)


# ------------------------------------------------------------------- keygen
def test_keygen_writes_an_openssh_key_pair(tmp_path: Path) -> None:
    out = tmp_path / "alice"

    result = invoke(["keygen", "--out", str(out), "--comment", "alice@host"])

    assert result.exit_code == 0, result.stderr
    pub_line = (tmp_path / "alice.pub").read_text()
    assert pub_line.endswith(" alice@host\n")
    assert pub_line.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5")
    assert result.stdout == (
        f"wrote {out} (private key, mode 0600) and {out}.pub\n"
        f"{pub_line}"
        "to trust it, add a line like this to the daemon's trust store "
        "(/etc/agentd/trusted_keys), with the roles it needs (admin,operator,oncall):\n"
        f"alice oncall {pub_line}"
    )
    assert result.stderr == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "alice.pub").stat().st_mode) == 0o644
    assert out.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = signing.load_private_key(out)
    assert signing.public_key_line(key, "alice@host") + "\n" == pub_line


def test_keygen_output_is_readable_by_ssh_keygen(tmp_path: Path, ssh_keygen: str) -> None:
    out = tmp_path / "k"
    assert invoke(["keygen", "-o", str(out), "-C", "x@y"]).exit_code == 0

    derived = subprocess.run(
        [ssh_keygen, "-y", "-f", str(out)], capture_output=True, text=True, check=True
    )

    assert derived.stdout.split()[:2] == (tmp_path / "k.pub").read_text().split()[:2]


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k"
    out.write_text("precious")

    result = invoke(["keygen", "--out", str(out)])

    assert result.exit_code == 1
    assert result.stderr == f"agentctl: error: {out} already exists; pass --force to replace it\n"
    assert out.read_text() == "precious"
    assert not (tmp_path / "k.pub").exists()


def test_keygen_refuses_when_only_the_pub_file_exists(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text("precious")

    result = invoke(["keygen", "--out", str(tmp_path / "k")])

    assert result.exit_code == 1
    assert not (tmp_path / "k").exists()


def test_keygen_force_replaces_with_mode_0600(tmp_path: Path) -> None:
    out = tmp_path / "k"
    out.write_text("old")
    out.chmod(0o644)

    result = invoke(["keygen", "--out", str(out), "--force", "-C", "a@b"])

    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    signing.load_private_key(out)


def test_keygen_json(tmp_path: Path) -> None:
    out = tmp_path / "k"

    result = invoke(["keygen", "--out", str(out), "--comment", "bob@ops", "--json"])

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    pub_line = (tmp_path / "k.pub").read_text().strip()
    raw = signing.load_private_key(out).public_key().public_bytes_raw()
    assert doc == {
        "private_key": str(out),
        "public_key": f"{out}.pub",
        "public_key_line": pub_line,
        "keyid": hashlib.sha256(raw).hexdigest(),
        "trust_store_line": f"bob oncall {pub_line}",
    }


def test_keygen_json_error(tmp_path: Path) -> None:
    out = tmp_path / "k"
    out.write_text("precious")

    result = invoke(["keygen", "--out", str(out), "--json"])

    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "error": {
            "exit_code": 1,
            "message": f"{out} already exists; pass --force to replace it",
            "status": None,
        }
    }
    assert result.stderr == f"agentctl: error: {out} already exists; pass --force to replace it\n"


def test_keygen_refuses_a_comment_with_a_line_break(tmp_path: Path) -> None:
    result = invoke(["keygen", "--out", str(tmp_path / "k"), "-C", "a\nadmin x"])

    assert result.exit_code == 1
    assert result.stderr == "agentctl: error: a key comment must not contain a line break\n"


# --------------------------------------------------------- offline signing
def test_kill_sign_only_makes_a_verifiable_envelope(key_file: Path) -> None:
    result = invoke(
        ["--key", str(key_file), "kill", "rogue", "--sign-only", "--audience", "host-a",
         "--reason", "runaway spend"]
    )

    env, cmd = _envelope(result)
    _assert_signed_by(env, key_file, audience="host-a")
    assert cmd.WhichOneof("action") == "kill"
    assert cmd.kill.name == "rogue"
    assert cmd.audience == "host-a"
    assert cmd.reason == "runaway spend"
    assert len(cmd.command_id) == 16
    assert cmd.issued_at.seconds == int(NOW)
    assert cmd.expires_at.seconds - cmd.issued_at.seconds == 300
    assert result.stderr == ""


def test_run_sign_only_carries_argv_and_limits(key_file: Path) -> None:
    result = invoke(
        ["run", "--name", "agent-1", "--user", "agent", "--memory", "512M", "--pids", "256",
         "--cpus", "0.5", "--key", str(key_file), "--audience", "host-a", "--sign-only",
         "--lifetime", "2m", "--", "python3", "-c", "print(1)", "--json"]
    )

    env, cmd = _envelope(result)
    _assert_signed_by(env, key_file, audience="host-a")
    assert cmd.run.name == "agent-1"
    assert cmd.run.user == "agent"
    # Everything after the command is the agent's, even what looks like our options.
    assert list(cmd.run.argv) == ["python3", "-c", "print(1)", "--json"]
    assert cmd.run.resources == agentd_pb2.Resources(
        memory_bytes=512 << 20, pids_max=256, cpu_millis=500
    )
    assert cmd.expires_at.seconds - cmd.issued_at.seconds == 120


def test_run_allow_fills_the_allowlist_overrides(key_file: Path) -> None:
    result = invoke(
        ["run", "--name", "w", "--key", str(key_file), "--audience", "h", "--sign-only",
         "--allow", "api.example.com:443", "--allow", "10.1.2.0/24:5432",
         "--egress-byte-cap", "1G", "--", "/bin/true"])

    _, cmd = _envelope(result)
    o = cmd.run.overrides
    assert list(o.allow) == ["api.example.com:443", "10.1.2.0/24:5432"]
    assert o.egress_byte_cap == 1 << 30
    # The daemon sets the network: --allow implies "allowlist" (policy.apply).
    assert not o.HasField("network")


def test_stop_sign_only_with_and_without_grace(key_file: Path) -> None:
    base = ["--key", str(key_file), "stop", "rogue", "--sign-only", "--audience", "h"]

    env, with_grace = _envelope(invoke([*base, "--grace", "500ms"]))
    _, without = _envelope(invoke(base))
    _assert_signed_by(env, key_file)

    assert with_grace.stop.grace_ms == 500
    assert not without.stop.HasField("grace_ms")


@pytest.mark.parametrize("verb", ["stop", "kill", "freeze", "thaw", "renew", "cut"])
def test_sign_only_names_the_run_given_with_id(key_file: Path, verb: str) -> None:
    base = ["--key", str(key_file), verb, "rogue", "--sign-only", "--audience", "h"]

    env, pinned = _envelope(invoke([*base, "--id", "rogue-1a2b3c4d"]))
    _, unpinned = _envelope(invoke(base))

    _assert_signed_by(env, key_file)
    assert pinned.WhichOneof("action") == verb
    assert getattr(pinned, verb).name == "rogue"
    assert getattr(pinned, verb).id == "rogue-1a2b3c4d"
    # Without --id: the command acts on whatever run holds the name.
    assert getattr(unpinned, verb).id == ""


def test_renew_sign_only_carries_the_ttl(key_file: Path) -> None:
    base = ["--key", str(key_file), "renew", "rogue", "--sign-only", "--audience", "h"]

    _, default = _envelope(invoke(base))
    _, longer = _envelope(invoke([*base, "--ttl", "2h"]))
    zero = invoke([*base, "--ttl", "0s"])

    assert default.renew.ttl_ms == 30_000
    assert longer.renew.ttl_ms == 7_200_000
    assert zero.exit_code == 2
    assert "'--ttl': must be between 1ms and 49 days" in zero.stderr


def test_cosign_shows_the_run_a_command_names(key_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert invoke(["keygen", "--out", str(other)]).exit_code == 0
    for extra, shown in (([], "kill 'rogue' for host"),
                         (["--id", "rogue-1a2b3c4d"], "kill 'rogue' (run 'rogue-1a2b3c4d') for")):
        signed = invoke(["--key", str(key_file), "kill", "rogue", "--sign-only",
                         "--audience", "h", *extra])
        path = tmp_path / "kill.env"
        path.write_text(signed.stdout)

        result = invoke(["--key", str(other), "cosign", str(path)])

        assert result.exit_code == 0, result.stderr
        assert result.stderr.startswith(f"co-signing: {shown}"), result.stderr


def test_signing_key_from_the_environment(key_file: Path) -> None:
    result = invoke(
        ["kill", "x", "--sign-only", "--audience", "h"], env={"AGENTCTL_KEY": str(key_file)}
    )

    _assert_signed_by(_envelope(result)[0], key_file)


def test_missing_key_is_one_clear_line() -> None:
    result = invoke(["kill", "rogue", "--sign-only", "--audience", "h"])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        "agentctl: error: no signing key: pass --key PATH or set AGENTCTL_KEY\n"
    )


def test_a_public_key_given_as_key_is_explained(key_file: Path, tmp_path: Path) -> None:
    pub = tmp_path / "k.pub"
    pub.write_text(signing.public_key_line(signing.load_private_key(key_file), "x") + "\n")

    result = invoke(["--key", str(pub), "kill", "x", "--sign-only", "--audience", "h"])

    assert result.exit_code == 1
    assert result.stderr == (
        f"agentctl: error: cannot use signing key: {pub} is a public key; "
        "give the private key (without .pub)\n"
    )


def test_encrypted_key_takes_the_passphrase_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "enc"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.BestAvailableEncryption(b"hunter2"),
        )
    )
    args = ["--key", str(path), "kill", "x", "--sign-only", "--audience", "h"]

    ok = invoke(args, env={"AGENTCTL_KEY_PASSPHRASE": "hunter2"})
    wrong = invoke(args, env={"AGENTCTL_KEY_PASSPHRASE": "nope"})
    # CliRunner's stdin is not a terminal: no prompt, a clear error instead.
    missing = invoke(args)

    _assert_signed_by(_envelope(ok)[0], path, b"hunter2")
    assert wrong.exit_code == 1
    assert "wrong passphrase" in wrong.stderr
    assert missing.exit_code == 1
    assert missing.stderr == (
        f"agentctl: error: signing key {path} is encrypted: set AGENTCTL_KEY_PASSPHRASE "
        "or run agentctl on a terminal to be asked\n"
    )


@pytest.mark.parametrize("passphrase", ["", "correct horse"])
def test_keys_made_by_ssh_keygen_work(tmp_path: Path, passphrase: str, ssh_keygen: str) -> None:
    path = tmp_path / "id_ed25519"
    subprocess.run(
        [ssh_keygen, "-q", "-t", "ed25519", "-N", passphrase, "-C", "op@laptop",
         "-f", str(path)],
        check=True,
    )

    result = invoke(
        ["--key", str(path), "kill", "x", "--sign-only", "--audience", "h"],
        env={"AGENTCTL_KEY_PASSPHRASE": passphrase} if passphrase else None,
    )

    _assert_signed_by(_envelope(result)[0], path, passphrase.encode() or None)


def test_pkcs8_pem_keys_work(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    result = invoke(["--key", str(path), "kill", "x", "--sign-only", "--audience", "h"])

    _assert_signed_by(_envelope(result)[0], path)


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "12X"], "Invalid value for '--memory': '12X' is not a size "
                              "(examples: 1048576, 64K, 512M, 1G)"),
        (["--memory", "0"], "Invalid value for '--memory': '0' must be more than 0 "
                            "(omit the option for the default)"),
        (["--cpus", "abc"], "Invalid value for '--cpus': 'abc' is not a CPU count "
                            "(examples: 0.5, 2, 250m)"),
        (["--cpus", "0"], "Invalid value for '--cpus': '0' must be at least 0.001 CPU (1m)"),
        (["--pids", "0"], "Invalid value for '--pids': 0 is not in the range 1<=x<=4294967295."),
        (["--lifetime", "5"], "Invalid value for '--lifetime': '5' needs a unit: "
                              "5s, 5ms, 5m or 5h"),
    ],
)
def test_bad_run_options_are_usage_errors(
    key_file: Path, args: list[str], message: str
) -> None:
    result = invoke(
        ["run", "--name", "a", "--key", str(key_file), "--audience", "h", "--sign-only",
         *args, "--", "true"]
    )

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"agentctl: error: {message} (see 'agentctl run --help')\n"


def test_bad_grace_is_a_usage_error(key_file: Path) -> None:
    result = invoke(["stop", "x", "--grace", "soon", "--key", str(key_file)])

    assert result.exit_code == 2
    assert result.stderr.startswith("agentctl: error: Invalid value for '--grace': 'soon'")
    assert result.stderr.count("\n") == 1


def test_run_needs_a_command(key_file: Path) -> None:
    result = invoke(["run", "--name", "a", "--key", str(key_file)])

    assert result.exit_code == 2
    assert result.stderr == (
        "agentctl: error: Missing argument '-- CMD [ARGS]...'. (see 'agentctl run --help')\n"
    )


def test_unknown_command_is_a_usage_error() -> None:
    result = invoke(["nuke"])

    assert result.exit_code == 2
    assert result.stderr == "agentctl: error: No such command 'nuke'. (see 'agentctl --help')\n"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1m30s", 90.0), ("0s", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert fmt.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("64K", 64 << 10), ("512M", 512 << 20), ("1G", 1 << 30),
     ("1.5G", 3 << 29), ("2t", 2 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert fmt.parse_size(text) == size


@pytest.mark.parametrize(("text", "millis"), [("0.5", 500), ("2", 2000), ("250m", 250)])
def test_parse_cpus(text: str, millis: int) -> None:
    assert fmt.parse_cpus(text) == millis


@pytest.mark.parametrize("bad", ["", "5", "5x", "-1s", "1.s", "s"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        fmt.parse_duration(bad)


@pytest.mark.parametrize("bad", ["", "-1", "1.5", "12X", "1e3", "0", "99999999999T"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        fmt.parse_size(bad)


@pytest.mark.parametrize("bad", ["", "-0.5", "0", "0.0001", "1.5m", "nan", "inf", "two"])
def test_parse_cpus_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        fmt.parse_cpus(bad)


def test_formatting() -> None:
    assert [fmt.format_bytes(n) for n in (0, 1023, 1024, 512 << 20, 3 << 29)] == [
        "0B", "1023B", "1K", "512M", "1.5G",
    ]
    assert [fmt.format_duration(s) for s in (0.85, 3.2, 45, 192, 7500, 300000)] == [
        "850ms", "3.2s", "45s", "3m12s", "2h05m", "3d11h",
    ]
    assert [fmt.format_ms(m) for m in (0.2, 1.8, 58.25, 5012.3)] == [
        "0.2 ms", "1.8 ms", "58.2 ms", "5.01 s",
    ]


def test_stop_deadline_covers_the_grace_period() -> None:
    assert stop_deadline(None) == 35.0
    assert stop_deadline(60.0) == 90.0


# --------------------------------------------------------------- unreachable
def test_missing_socket_exits_7_with_one_line(short_dir: Path) -> None:
    sock = short_dir / "agentd.sock"

    result = invoke(["--socket", str(sock), "info"])

    assert result.exit_code == 7
    assert result.stdout == ""
    assert result.stderr == UNREACHABLE.format(sock)


def test_socket_from_the_environment(short_dir: Path) -> None:
    sock = short_dir / "env.sock"

    result = invoke(["ps"], env={"AGENTD_SOCKET": str(sock)})

    assert result.exit_code == 7
    assert result.stderr == UNREACHABLE.format(sock)


def test_default_socket_is_named() -> None:
    result = invoke(["status", "x"])

    assert result.exit_code == 7
    assert result.stderr == UNREACHABLE.format("/run/agentd/agentd.sock")


def test_a_dead_daemons_socket_is_refused(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves

        result = invoke(["--socket", str(path), "info"])

    assert result.exit_code == 7
    assert result.stderr == (
        f"agentctl: error: cannot reach agentd at {path}: connection refused "
        "(is the daemon running? set --socket or AGENTD_SOCKET)\n"
    )


def test_a_file_that_is_not_a_socket(short_dir: Path) -> None:
    path = short_dir / "plain"
    path.write_text("")

    result = invoke(["--socket", str(path), "info"])

    assert result.exit_code == 7
    assert f"cannot reach agentd at {path}: not a socket" in result.stderr


def test_kill_without_audience_needs_the_daemon(key_file: Path, short_dir: Path) -> None:
    sock = short_dir / "agentd.sock"

    result = invoke(["--key", str(key_file), "--socket", str(sock), "kill", "rogue"])

    assert result.exit_code == 7
    assert result.stderr == UNREACHABLE.format(sock)


def test_json_error_on_stdout_and_one_line_on_stderr(short_dir: Path) -> None:
    sock = short_dir / "agentd.sock"

    for args in (["--json", "--socket", str(sock), "info"],
                 ["--socket", str(sock), "info", "--json"]):
        result = invoke(args)

        assert result.exit_code == 7
        assert json.loads(result.stdout) == {
            "error": {
                "exit_code": 7,
                "message": UNREACHABLE.format(sock).removeprefix("agentctl: error: ").strip(),
                "status": "UNAVAILABLE",
            }
        }
        assert result.stderr == UNREACHABLE.format(sock)


def test_send_reads_an_envelope_from_stdin(key_file: Path, short_dir: Path) -> None:
    signed = invoke(["--key", str(key_file), "kill", "x", "--sign-only", "--audience", "h"])
    sock = short_dir / "agentd.sock"

    result = invoke(["--socket", str(sock), "send", "-"], input=signed.stdout)

    assert result.exit_code == 7  # parsed fine; nobody to send it to
    assert result.stderr == UNREACHABLE.format(sock)


def test_send_rejects_what_is_not_an_envelope(tmp_path: Path) -> None:
    bad = tmp_path / "cmd.json"
    bad.write_text('{"payloadType": "x", "payload": "!!!", "signatures": []}')

    result = invoke(["send", str(bad)])

    assert result.exit_code == 2
    assert result.stderr == (
        "agentctl: error: Invalid value for FILE: not a signed agentd command: "
        "payload is not valid base64 (see 'agentctl send --help')\n"
    )


# -------------------------------------------------------------- audit verify
def _audit_log(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        for i in range(n):
            log.append("kill", name=f"a{i}")
    return path


def test_audit_verify_ok(tmp_path: Path) -> None:
    path = _audit_log(tmp_path, 5)
    head = json.loads((tmp_path / "audit.log.head").read_text())["sha256"]

    result = invoke(["audit", "verify", str(path)])

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"audit log OK: 5 records, head {head}\n"
    assert result.stderr == ""


def test_audit_verify_says_when_there_is_no_head(tmp_path: Path) -> None:
    path = _audit_log(tmp_path, 2)
    (tmp_path / "audit.log.head").unlink()

    result = invoke(["audit", "verify", str(path)])

    assert result.exit_code == 0
    assert result.stderr == (
        "note: no head to check against (no audit.log.head, no --head-file): "
        "removal of trailing records cannot be ruled out\n"
    )


def test_audit_verify_tampered(tmp_path: Path) -> None:
    path = _audit_log(tmp_path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"a2"', b'"zz"')
    path.write_bytes(b"".join(lines))

    result = invoke(["audit", "verify", str(path)])

    assert result.exit_code == 10
    assert result.stdout == (
        f"audit log {path} FAILED verification (1 problems):\n"
        "  line 3 (seq 2): record was edited: its hash does not match 'prev' of seq 3\n"
    )
    assert result.stderr == (
        f"agentctl: error: audit log {path} failed verification: 1 problems\n"
    )


def test_audit_verify_truncated_against_head_file(tmp_path: Path) -> None:
    path = _audit_log(tmp_path, 5)
    head = tmp_path / "saved.head"
    head.write_bytes((tmp_path / "audit.log.head").read_bytes())
    (tmp_path / "audit.log.head").unlink()
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:3]))

    result = invoke(["audit", "verify", str(path), "--head-file", str(head), "--json"])

    assert result.exit_code == 10
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert doc["problems"] == ["log has 3 records but the daemon's head says 5: truncated"]
    assert doc["expected_head"]["seq"] == 4


def test_audit_verify_missing_file(tmp_path: Path) -> None:
    result = invoke(["audit", "verify", str(tmp_path / "nope.log")])

    assert result.exit_code == 1
    assert result.stderr == (
        f"agentctl: error: cannot read audit log {tmp_path / 'nope.log'}: "
        "No such file or directory\n"
    )


# ------------------------------------------------- against a stand-in daemon
class FakeAgentd(agentd_pb2_grpc.AgentdServicer):
    """Answers like agentd would, records what it was sent, fails on demand."""

    def __init__(self) -> None:
        self.info = agentd_pb2.InfoResponse(
            host_id=HOST, version="0.1.0", max_command_lifetime_s=300, clock_skew_s=30,
            cgroup_mode="v2", kill_method="cgroup.kill",
        )
        self.kill_result = agentd_pb2.KillResult(
            name="rogue", id="a-1", processes_killed=3, duration_ms=1.8, verified_empty=True,
            method="cgroup.kill", state=agentd_pb2.AGENT_STATE_KILLED,
        )
        self.agents: list[agentd_pb2.Agent] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.hold: threading.Event | None = None  # Kill waits for it: a slow kill
        self.received: list[tuple[str, agentd_pb2.Envelope, float]] = []
        self.looked_up = 0  # GetAgent calls
        # Renew: after this many renewals, the agent's run is replaced (a new id).
        self.replace_after: int | None = None

    def _check(self, context: grpc.ServicerContext) -> None:
        if self.fail is not None:
            context.abort(*self.fail)

    def Info(self, request: Any, context: grpc.ServicerContext) -> agentd_pb2.InfoResponse:
        self._check(context)
        return self.info

    def ListAgents(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(context)
        return agentd_pb2.ListAgentsResponse(agents=self.agents)

    def GetAgent(self, request: Any, context: grpc.ServicerContext) -> agentd_pb2.Agent:
        self.looked_up += 1
        self._check(context)
        for agent in self.agents:
            if agent.name == request.name:
                return agent
        context.abort(grpc.StatusCode.NOT_FOUND, f"no agent named {request.name!r}")

    def _signed(self, rpc: str, env: agentd_pb2.Envelope, context: grpc.ServicerContext) -> None:
        self.received.append((rpc, env, context.time_remaining() or 0.0))
        self._check(context)

    def Run(self, request: agentd_pb2.Envelope, context: grpc.ServicerContext) -> Any:
        self._signed("Run", request, context)
        return self.agents[0]

    def Stop(self, request: agentd_pb2.Envelope, context: grpc.ServicerContext) -> Any:
        self._signed("Stop", request, context)
        return self.kill_result

    def Kill(self, request: agentd_pb2.Envelope, context: grpc.ServicerContext) -> Any:
        self._signed("Kill", request, context)
        if self.hold is not None:
            self.hold.wait(10)
        return self.kill_result

    def Renew(self, request: agentd_pb2.Envelope, context: grpc.ServicerContext) -> Any:
        """As the daemon: a renew that names a run other than the current one is refused."""
        self._signed("Renew", request, context)
        agent = self.agents[0]
        renews = sum(1 for rpc, _, _ in self.received if rpc == "Renew")
        if self.replace_after is not None and renews > self.replace_after:
            agent.id = "rogue-9f8e7d6c"
        action = agentd_pb2.Command.FromString(request.payload).renew
        if action.id and action.id != agent.id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"agent 'rogue' is now run {agent.id}, not {action.id}")
        return agentd_pb2.LeaseResult(name=agent.name, id=agent.id, ttl_ms=action.ttl_ms,
                                      remaining_ms=action.ttl_ms - 0.5)


@pytest.fixture
def fake(short_dir: Path) -> Iterator[tuple[FakeAgentd, Path]]:
    sock = short_dir / "agentd.sock"
    servicer = FakeAgentd()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agentd_pb2_grpc.add_AgentdServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield servicer, sock
    finally:
        server.stop(None).wait()


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromSeconds(int(t))
    return ts


def _agent(name: str = "rogue") -> agentd_pb2.Agent:
    return agentd_pb2.Agent(
        name=name, id="a-1", state=agentd_pb2.AGENT_STATE_RUNNING, pids=[4242, 4243],
        memory_bytes=12 << 20, main_pid=4242,
        cgroup_paths=["/sys/fs/cgroup/agentd/rogue", "/sys/fs/cgroup/unified/agentd/rogue"],
        started_at=_ts(NOW - 192), user="agent", uid=999, argv=["python3", "-c", "x y"],
        resources=agentd_pb2.Resources(memory_bytes=512 << 20, pids_max=256, cpu_millis=500),
        stdout_log="/var/log/agentd/rogue.out", stderr_log="/var/log/agentd/rogue.err",
        started_by="alice",
    )


def test_kill_prints_the_exact_result(fake: tuple[FakeAgentd, Path], key_file: Path) -> None:
    servicer, sock = fake

    result = invoke(["--socket", str(sock), "--key", str(key_file), "kill", "rogue"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "killed 'rogue': 3 processes, cgroup verified empty in 1.8 ms (cgroup.kill)\n"
    )
    (rpc, env, remaining), = servicer.received
    assert rpc == "Kill"
    _assert_signed_by(env, key_file, audience=HOST)
    cmd = agentd_pb2.Command.FromString(env.payload)
    assert cmd.audience == HOST  # from Info
    # The deadline as the server saw it (a little slack for clock rounding).
    assert 25 < remaining <= 30.5


def test_kill_json_has_numbers(fake: tuple[FakeAgentd, Path], key_file: Path) -> None:
    _, sock = fake

    result = invoke(["--socket", str(sock), "--key", str(key_file), "kill", "rogue", "--json"])

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["processes_killed"] == 3
    assert doc["duration_ms"] == 1.8
    assert doc["verified_empty"] is True
    assert doc["state"] == "AGENT_STATE_KILLED"


def test_stuck_processes_exit_8(fake: tuple[FakeAgentd, Path], key_file: Path) -> None:
    servicer, sock = fake
    servicer.kill_result.verified_empty = False
    servicer.kill_result.duration_ms = 5000.0
    servicer.kill_result.stuck.add(pid=4242, state="D", wchan="nfs_wait", comm="python3")

    result = invoke(["--socket", str(sock), "--key", str(key_file), "kill", "rogue"])

    assert result.exit_code == 8
    assert result.stdout == (
        "killed 'rogue': 3 processes, but the cgroup is NOT empty after 5.00 s (cgroup.kill); "
        "1 still present:\n"
        "  PID   STATE  WCHAN     COMM\n"
        "  4242  D      nfs_wait  python3\n"
        "agentd keeps watching them: a process in D state dies when it leaves the kernel "
        "(check with: agentctl status rogue)\n"
    )
    assert result.stderr == (
        "agentctl: error: kill of 'rogue' incomplete: processes still present (pids 4242); "
        "agentd keeps watching them\n"
    )


def test_stuck_processes_json_is_one_document(
    fake: tuple[FakeAgentd, Path], key_file: Path
) -> None:
    servicer, sock = fake
    servicer.kill_result.verified_empty = False

    result = invoke(["--json", "--socket", str(sock), "--key", str(key_file), "kill", "rogue"])

    assert result.exit_code == 8
    assert json.loads(result.stdout)["verified_empty"] is False


def test_stop_deadline_and_grace(fake: tuple[FakeAgentd, Path], key_file: Path) -> None:
    servicer, sock = fake

    result = invoke(
        ["--socket", str(sock), "--key", str(key_file), "stop", "rogue", "--grace", "20s"]
    )

    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("stopped 'rogue': 3 processes")
    (_, env, remaining), = servicer.received
    assert agentd_pb2.Command.FromString(env.payload).stop.grace_ms == 20000
    assert 45 < remaining <= 50.5


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 3),
        (grpc.StatusCode.PERMISSION_DENIED, 4),
        (grpc.StatusCode.NOT_FOUND, 5),
        (grpc.StatusCode.FAILED_PRECONDITION, 6),
        (grpc.StatusCode.ALREADY_EXISTS, 6),
        (grpc.StatusCode.INVALID_ARGUMENT, 9),
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_daemon_refusals_map_to_exit_codes(
    fake: tuple[FakeAgentd, Path], key_file: Path, code: grpc.StatusCode, exit_code: int
) -> None:
    servicer, sock = fake
    servicer.fail = (code, "refused: alice (oncall)\nmay not do this")

    result = invoke(
        ["--socket", str(sock), "--key", str(key_file), "kill", "rogue", "--audience", HOST]
    )

    assert result.exit_code == exit_code
    assert result.stdout == ""
    assert result.stderr == (
        f"agentctl: error: {code.name}: refused: alice (oncall) may not do this\n"
    )


def test_a_kill_that_outlives_its_deadline(
    fake: tuple[FakeAgentd, Path], key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, sock = fake
    servicer.hold = threading.Event()
    monkeypatch.setattr(client_mod, "KILL_DEADLINE_S", 0.3)  # rather than wait 30 s

    try:
        result = invoke(["--socket", str(sock), "--key", str(key_file), "kill", "rogue"])
    finally:
        servicer.hold.set()

    assert result.exit_code == 1
    assert result.stderr == (
        "agentctl: error: DEADLINE_EXCEEDED: agentd did not answer within 0.3 s; "
        "the command may still be carried out (check: agentctl status NAME)\n"
    )


def test_lifetime_beyond_the_daemons_limit(fake: tuple[FakeAgentd, Path], key_file: Path) -> None:
    _, sock = fake

    result = invoke(
        ["--socket", str(sock), "--key", str(key_file), "kill", "x", "--lifetime", "1h"]
    )

    assert result.exit_code == 2
    assert result.stderr == (
        "agentctl: error: Invalid value for '--lifetime': 1h00m is longer than the daemon "
        "accepts (5m00s) (see 'agentctl kill --help')\n"
    )


def test_ps_and_status(fake: tuple[FakeAgentd, Path]) -> None:
    servicer, sock = fake
    servicer.agents = [_agent()]

    ps = invoke(["--socket", str(sock), "ps"])
    status = invoke(["--socket", str(sock), "status", "rogue"])
    missing = invoke(["--socket", str(sock), "status", "nobody"])

    assert ps.stdout == (
        "NAME   STATE    PIDS  MEM  UPTIME  USER   ID\n"
        "rogue  running  2     12M  3m12s   agent  a-1\n"
    )
    assert status.stdout == (
        "name:        rogue\n"
        "id:          a-1\n"
        "state:       running\n"
        "main pid:    4242\n"
        "pids:        2: 4242 4243\n"
        "memory:      12M\n"
        "cgroups:     /sys/fs/cgroup/agentd/rogue\n"
        "             /sys/fs/cgroup/unified/agentd/rogue\n"
        "user:        agent (uid 999)\n"
        "command:     python3 -c 'x y'\n"
        "limits:      memory 512M, pids 256, cpus 0.5\n"
        "started:     2025-06-15 15:03:28Z (3m12s ago)\n"
        "ended:       -\n"
        "exit:        -\n"
        "end reason:  -\n"
        "lease:       -\n"
        "max runtime: -\n"
        "oom kills:   0\n"
        "stdout log:  /var/log/agentd/rogue.out\n"
        "stderr log:  /var/log/agentd/rogue.err\n"
        "started by:  alice\n"
        "signals:     not sampled yet\n"
    )
    assert missing.exit_code == 5
    assert missing.stderr == "agentctl: error: NOT_FOUND: no agent named 'nobody'\n"


def test_status_lists_the_filesystem_view_and_marks_a_workspace(
        fake: tuple[FakeAgentd, Path]) -> None:
    servicer, sock = fake
    agent = _agent()
    V = agentd_pb2.ViewEntry
    agent.sandbox.CopyFrom(agentd_pb2.Sandbox(
        policy="default", network="none", user="dynamic:61999", scratch_bytes=256 << 20,
        view=[V(path="/usr", kind="bind", source="/usr"),
              V(path="/bin", kind="symlink", source="usr/bin"),
              V(path="/scratch", kind="tmpfs", writable=True, source="private tmpfs"),
              V(path="/srv/notes", kind="bind", writable=True, source="/srv/notes"),
              V(path="/etc/shadow", kind="mask", source="/dev/null", why="password hashes")]))
    servicer.agents = [agent]

    status = invoke(["--socket", str(sock), "status", "rogue"])

    assert status.stdout.split("checked from outside at launch: 0 ok\n", 1)[1].split(
        "signals:")[0] == (
        "             filesystem view (nothing else of the host):\n"
        "               /usr         ro  host /usr\n"
        "               /bin         ->  usr/bin\n"
        "               /scratch     rw  private tmpfs\n"
        "               /srv/notes   rw  host /srv/notes  WORKSPACE (writable host directory)\n"
        "               /etc/shadow  ro  /dev/null: masked (password hashes)\n"
    )


def test_status_shows_the_sandbox_checked_from_outside(fake: tuple[FakeAgentd, Path]) -> None:
    servicer, sock = fake
    agent = _agent()
    agent.user, agent.uid = "dynamic:61999", 61999
    agent.sandbox.CopyFrom(agentd_pb2.Sandbox(
        policy="default", network="none", user="dynamic:61999", scratch_bytes=256 << 20,
        entrypoint_sha256="ab" * 32,
        checks=[agentd_pb2.RestrictionCheck(name="user", ok=True, detail="uid 61999 in 3"),
                agentd_pb2.RestrictionCheck(name="network namespace", ok=False,
                                            detail="pid 7 shares the daemon's net:[1]")]))
    servicer.agents = [agent]

    status = invoke(["--socket", str(sock), "status", "rogue"])

    assert status.stdout.split("started by:  alice\n", 1)[1] == (
        "sandbox:     policy default: network none, user dynamic:61999, scratch 256M\n"
        f"             entrypoint sha256 {'ab' * 32}\n"
        "             checked from outside at launch: 1 ok, 1 FAILED\n"
        "             ok      user               uid 61999 in 3\n"
        "             FAILED  network namespace  pid 7 shares the daemon's net:[1]\n"
        "signals:     not sampled yet\n"
    )


def test_run_sends_the_policy_and_overrides(key_file: Path) -> None:
    result = invoke(["--key", str(key_file), "run", "--name", "w", "--policy", "web",
                     "--network", "host", "--bind-ro", "/srv/a", "--bind-rw", "/srv/b",
                     "--scratch", "64M", "--nofile", "4096", "--pin", "AB" * 32,
                     "--env", "LANG=C", "--sign-only", "--audience", HOST, "--",
                     "/bin/true"])

    assert result.exit_code == 0, result.stderr
    run = agentd_pb2.Command.FromString(
        signing.envelope_from_json(result.stdout).payload).run
    assert run.policy == "web"
    o = run.overrides
    assert (o.network, list(o.bind_ro), list(o.bind_rw)) == ("host", ["/srv/a"], ["/srv/b"])
    assert (o.scratch_bytes, o.nofile, o.entrypoint_sha256) == (64 << 20, 4096, "ab" * 32)
    assert list(o.env) == ["LANG=C"]
    assert not agentd_pb2.Command.FromString(signing.envelope_from_json(
        invoke(["--key", str(key_file), "run", "--name", "w", "--sign-only", "--audience",
                HOST, "--", "/bin/true"]).stdout).payload).run.overrides.HasField("network")


@pytest.mark.parametrize(("args", "words"), [
    (["--network", "bridge"], "'--network'"),
    (["--pin", "xyz"], "64 hex digits"),
    (["--env", "NOEQUALS"], "NAME=VALUE"),
    (["--scratch", "lots"], "'--scratch'"),
])
def test_bad_sandbox_options_are_usage_errors(key_file: Path, args: list[str],
                                              words: str) -> None:
    result = invoke(["--key", str(key_file), "run", "--name", "w", *args, "--", "/bin/true"])
    assert result.exit_code == 2
    assert words in result.stderr


def test_ps_json_keeps_numbers(fake: tuple[FakeAgentd, Path]) -> None:
    servicer, sock = fake
    servicer.agents = [_agent()]

    doc = json.loads(invoke(["--socket", str(sock), "ps", "--json"]).stdout)

    assert doc["agents"][0]["memory_bytes"] == 12 << 20
    assert doc["agents"][0]["resources"]["memory_bytes"] == 512 << 20
    assert doc["agents"][0]["pids"] == [4242, 4243]


def test_online_kill_by_name_alone_names_no_run(
    fake: tuple[FakeAgentd, Path], key_file: Path
) -> None:
    """The on-call path: 'kill NAME' ends whatever runs under NAME now, no lookup first."""
    servicer, sock = fake
    servicer.agents = [_agent()]

    result = invoke(["--socket", str(sock), "--key", str(key_file), "kill", "rogue"])

    assert result.exit_code == 0, result.stderr
    (_, env, _), = servicer.received
    assert agentd_pb2.Command.FromString(env.payload).kill.id == ""
    assert servicer.looked_up == 0


def test_keepalive_pins_the_run_it_started_on(
    fake: tuple[FakeAgentd, Path], key_file: Path
) -> None:
    servicer, sock = fake
    servicer.agents = [_agent()]

    result = invoke(["--socket", str(sock), "--key", str(key_file), "keepalive", "rogue",
                     "--every", "1ms", "--ttl", "1s", "--count", "3"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "renewed 'rogue' (run a-1): lease 1s, 1.0s left\n" * 3
    renews = [agentd_pb2.Command.FromString(env.payload).renew
              for rpc, env, _ in servicer.received if rpc == "Renew"]
    assert [(r.name, r.id, r.ttl_ms) for r in renews] == [("rogue", "a-1", 1000)] * 3
    assert servicer.looked_up == 1  # once, at the start


def test_keepalive_exits_11_when_its_run_is_replaced(
    fake: tuple[FakeAgentd, Path], key_file: Path
) -> None:
    servicer, sock = fake
    servicer.agents = [_agent()]
    servicer.replace_after = 2

    result = invoke(["--socket", str(sock), "--key", str(key_file), "keepalive", "rogue",
                     "--every", "1ms", "--ttl", "1s", "--count", "5"])

    assert result.exit_code == 11, result.stderr
    assert result.stdout.count("renewed 'rogue' (run a-1)") == 2
    assert result.stderr == (
        "agentctl: error: RENEWAL REFUSED for 'rogue' (run a-1): FAILED_PRECONDITION: agent "
        "'rogue' is now run rogue-9f8e7d6c, not a-1 -- the agent will be killed when its "
        "lease runs out\n"
    )


def test_keepalive_with_id_does_not_look_the_run_up(
    fake: tuple[FakeAgentd, Path], key_file: Path
) -> None:
    servicer, sock = fake
    servicer.agents = [_agent()]

    result = invoke(["--socket", str(sock), "--key", str(key_file), "keepalive", "rogue",
                     "--id", "rogue-0ld", "--every", "1ms", "--ttl", "1s", "--count", "1"])

    assert result.exit_code == 11
    assert "(run rogue-0ld)" in result.stderr
    assert servicer.looked_up == 0


def test_send_picks_the_rpc_from_the_payload(
    fake: tuple[FakeAgentd, Path], key_file: Path, tmp_path: Path
) -> None:
    servicer, sock = fake
    signed = invoke(
        ["--key", str(key_file), "stop", "rogue", "--sign-only", "--audience", HOST,
         "--grace", "1s"]
    )
    cmd_file = tmp_path / "cmd.json"
    cmd_file.write_text(signed.stdout)

    result = invoke(["--socket", str(sock), "send", str(cmd_file)])

    assert result.exit_code == 0, result.stderr
    (rpc, env, _), = servicer.received
    assert rpc == "Stop"
    assert env == signing.envelope_from_json(signed.stdout)
    _assert_signed_by(env, key_file, audience=HOST)


def test_audit_verify_against_the_daemons_head(
    fake: tuple[FakeAgentd, Path], tmp_path: Path
) -> None:
    servicer, sock = fake
    path = _audit_log(tmp_path, 4)
    head = json.loads((tmp_path / "audit.log.head").read_text())
    servicer.info.audit_log = str(path)
    servicer.info.audit_head = head["sha256"]
    servicer.info.audit_records = 4
    (tmp_path / "audit.log.head").unlink()  # the daemon's word, not the file's

    ok = invoke(["--socket", str(sock), "audit", "verify"])
    servicer.info.audit_records = 6
    truncated = invoke(["--socket", str(sock), "audit", "verify"])

    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout == f"audit log OK: 4 records, head {head['sha256']}\n"
    assert truncated.exit_code == 10
    assert "log has 4 records but the daemon's head says 6: truncated" in truncated.stdout


def test_info_text(fake: tuple[FakeAgentd, Path]) -> None:
    servicer, sock = fake
    servicer.info.replay_degraded_until.FromSeconds(int(NOW) + 120)

    result = invoke(["--socket", str(sock), "info"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "host id (audience):   host-test\n"
        "version:              0.1.0\n"
        "cgroup mode:          v2\n"
        "kill method:          cgroup.kill\n"
        "max command lifetime: 5m00s\n"
        "allowed clock skew:   30s\n"
        "replay cache:         rebuilding until 2025-06-15 15:08:40Z (in 2m00s): "
        "only stop, kill and estop are accepted until then\n"
        "emergency stop:       not latched\n"
        "reset needs:          0 distinct principal(s)\n"
        "leases:               optional\n"
        "guardian:             -\n"
        "audit log:            -\n"
        "audit records:        0\n"
        "audit head:           -\n"
    )


# ------------------------------------------------------------------ plumbing
def test_no_traceback_on_an_internal_error(short_dir: Path) -> None:
    def broken_connect(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    settings = Settings(clock=lambda: NOW, connect=broken_connect)

    result = invoke(["info"], settings=settings)

    assert result.exit_code == 1
    assert result.stderr == (
        "agentctl: error: internal error: RuntimeError: boom "
        "(set AGENTCTL_DEBUG=1 for the traceback)\n"
    )


def test_help_exits_0() -> None:
    result = invoke(["--help"])

    assert result.exit_code == 0
    assert "kill" in result.stdout


def test_click_exceptions_are_agentctl_errors() -> None:
    from agentctl import errors

    assert issubclass(errors.AgentctlError, click.ClickException)
    codes = {
        cls.__name__: cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.AgentctlError)
    }
    assert codes == {
        "AgentctlError": 1, "Unauthenticated": 3, "PermissionDenied": 4, "NotFound": 5,
        "Refused": 6, "DaemonUnreachable": 7, "KillIncomplete": 8, "InvalidArgument": 9,
        "AuditBroken": 10, "LeaseLost": 11, "Interrupted": 130,
    }


def test_the_installed_entry_point_runs() -> None:
    """The real process: one stderr line, exit 7, no traceback."""
    sock = "/nonexistent/agentd.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "AGENTCTL_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "agentctl", "--socket", sock, "info"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 7
    assert proc.stderr == UNREACHABLE.format(sock)



def test_a_kill_whose_record_is_pending_succeeds_and_says_so(
        fake: tuple[FakeAgentd, Path], key_file: Path) -> None:
    """A full disk: the kill happened (exit 0, the same result line), with a warning on stderr."""
    servicer, sock = fake
    servicer.kill_result.audit_pending = True

    result = invoke(["--socket", str(sock), "--key", str(key_file), "kill", "rogue"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "killed 'rogue': 3 processes, cgroup verified empty in 1.8 ms (cgroup.kill)\n"
    )
    assert result.stderr == ("warning: done, but its audit record is not on disk yet (the "
                             "daemon's disk is full or slow); agentd keeps it and writes it, "
                             "in order, as soon as it can\n")


def test_stop_class_commands_go_to_the_emergency_socket(
        fake: tuple[FakeAgentd, Path], key_file: Path, tmp_path: Path) -> None:
    """--stop-socket: kill goes there (Info for the audience too); the control socket is unused."""
    servicer, sock = fake
    missing = tmp_path / "no-such.sock"
    result = invoke(["--socket", str(missing), "--stop-socket", str(sock), "--key",
                     str(key_file), "kill", "rogue"])
    assert result.exit_code == 0, result.stderr
    assert [r[0] for r in servicer.received] == ["Kill"]
    # Everything else still goes to the control socket.
    result = invoke(["--socket", str(missing), "--stop-socket", str(sock), "ps"])
    assert result.exit_code == 7, result.stdout
