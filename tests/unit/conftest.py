"""Fixtures for the unit tests: real keys, real files, real write failures, no mocks."""

from __future__ import annotations

import base64
import contextlib
import resource
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentd.signing import new_command, public_key_line, sign_command
from agentd.v1 import agentd_pb2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.auth import Limits, TrustStore

HOST = "host-a"
NOW = 1_750_000_000.0


@dataclass(frozen=True)
class Signer:
    principal: str
    roles: str
    key: Ed25519PrivateKey

    def line(self) -> str:
        return (
            f"{self.principal} {self.roles} {public_key_line(self.key, self.principal + '@test')}"
        )


@pytest.fixture
def alice() -> Signer:
    return Signer("alice", "admin", Ed25519PrivateKey.generate())


@pytest.fixture
def bob() -> Signer:
    return Signer("bob", "operator", Ed25519PrivateKey.generate())


@pytest.fixture
def carol() -> Signer:
    return Signer("carol", "oncall", Ed25519PrivateKey.generate())


@pytest.fixture
def store(alice: Signer, bob: Signer, carol: Signer) -> TrustStore:
    text = "\n".join(s.line() for s in (alice, bob, carol)) + "\n"
    return TrustStore.parse(text, "/etc/agentd/trusted_keys")


@pytest.fixture
def limits() -> Limits:
    return Limits()


def ssh_line_for_raw(raw: bytes) -> str:
    """`ssh-ed25519 BASE64` for any 32 bytes, even a point pyca would never emit."""
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", len(raw)) + raw
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


@pytest.fixture
def raw_key_line() -> Callable[[bytes], str]:
    return ssh_line_for_raw


CommandFactory = Callable[..., agentd_pb2.Command]


@pytest.fixture
def command() -> CommandFactory:
    """Build a command for HOST at NOW with the given action."""

    def make(
        action: str = "kill",
        *,
        audience: str = HOST,
        now: float = NOW,
        lifetime_s: float = 300.0,
    ) -> agentd_pb2.Command:
        cmd = new_command(audience=audience, reason="test", now=now, lifetime_s=lifetime_s)
        if action == "run":
            cmd.run.name = "agent-1"
            cmd.run.argv.extend(["sleep", "60"])
        elif action == "stop":
            cmd.stop.name = "agent-1"
        elif action == "kill":
            cmd.kill.name = "agent-1"
        return cmd

    return make


@pytest.fixture
def signed(command: CommandFactory) -> Callable[..., agentd_pb2.Envelope]:
    """sign_command(command(action, ...), signer.key)."""

    def make(signer: Signer, action: str = "kill", **kw: float | str) -> agentd_pb2.Envelope:
        return sign_command(command(action, **kw), signer.key)

    return make


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[..., Path]:
    def write(text: str, name: str = "trusted_keys", mode: int = 0o600) -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(mode)
        return path

    return write


@pytest.fixture
def now() -> float:
    """The fixed 'current time' every command in these tests is built around."""
    return NOW


@pytest.fixture
def host() -> str:
    """The host id of the daemon under test."""
    return HOST


@pytest.fixture
def ssh_keygen() -> str:
    """The path of ssh-keygen; fails (never skips) when it is missing.

    Keys made by OpenSSH are what operators use: a missing tool must not
    quietly drop those tests. `make deps` installs openssh-client.
    """
    path = shutil.which("ssh-keygen")
    if path is None:
        pytest.fail("ssh-keygen is not installed: install openssh-client ('make deps')",
                    pytrace=False)
    return path


@contextlib.contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    # RLIMIT_FSIZE makes write(2) past nbytes fail with EFBIG (SIGXFSZ
    # ignored): a real kernel write failure, for root too, with no full disk.
    # Process-wide: keep the block to the one call under test.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.fixture
def file_size_limit() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """`with file_size_limit(n):` writes that would grow a file past n bytes fail (EFBIG)."""
    return _file_size_limit
