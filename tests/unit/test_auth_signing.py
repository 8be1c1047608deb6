"""The signer's side: JSON envelopes, co-signing, loading real ssh-keygen keys."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from agentd.dsse import COMMAND_PAYLOAD_TYPE, keyid
from agentd.signing import (
    cosign,
    envelope_from_json,
    envelope_to_json,
    load_private_key,
    new_command,
    public_key_line,
    sign_command,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.auth import Limits, TrustStore, verify


def _keygen(ssh_keygen: str, path: Path, passphrase: str, key_type: str = "ed25519") -> Path:
    subprocess.run(
        [ssh_keygen, "-q", "-t", key_type, "-N", passphrase, "-C", "test@host", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def test_new_command_fields(now) -> None:
    a = new_command(audience="h", reason="why", now=now, lifetime_s=60)
    b = new_command(audience="h", reason="why", now=now)
    assert len(a.command_id) == 16 and a.command_id != b.command_id
    assert a.issued_at.seconds == int(now)
    assert a.expires_at.seconds == int(now) + 60
    assert b.expires_at.seconds == int(now) + 300
    with pytest.raises(ValueError, match="lifetime must be a positive"):
        new_command(audience="h", reason="", now=now, lifetime_s=0)


def test_sign_then_verify_end_to_end(signed, bob, store, host, now) -> None:
    env = signed(bob, "stop")
    assert env.payload_type == COMMAND_PAYLOAD_TYPE
    assert env.signatures[0].keyid == keyid(bob.key.public_key().public_bytes_raw())
    v = verify(env, trust=store, audience=host, expected_action="stop", now=now, limits=Limits())
    assert v.principals == ("bob",)


def test_json_round_trip(signed, alice, bob) -> None:
    env = cosign(signed(bob, "run"), alice.key)
    text = envelope_to_json(env)
    obj = json.loads(text)
    assert set(obj) == {"payloadType", "payload", "signatures"}
    assert obj["signatures"][0]["keyid"] == env.signatures[0].keyid.hex()
    back = envelope_from_json(text)
    assert back == env
    assert back.payload == env.payload  # the very bytes that were signed


def test_json_accepts_url_safe_base64_and_missing_keyid(signed, bob) -> None:
    env = signed(bob)
    obj = json.loads(envelope_to_json(env))
    obj["payload"] = obj["payload"].replace("+", "-").replace("/", "_")
    del obj["signatures"][0]["keyid"]
    back = envelope_from_json(json.dumps(obj))
    assert back.payload == env.payload
    assert back.signatures[0].keyid == b""


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("not json", "envelope is not valid JSON"),
        ("[]", "must be an object"),
        ('{"payload": "", "signatures": []}', "envelope has no 'payloadType' field"),
        ('{"payloadType": 1, "payload": "", "signatures": []}', "'payloadType' must be a str"),
        ('{"payloadType": "t", "payload": "!!", "signatures": []}', "payload is not valid base64"),
        ('{"payloadType": "t", "payload": "", "signatures": {}}', "'signatures' must be a list"),
        ('{"payloadType": "t", "payload": "", "signatures": [1]}', "signature 1 must be an object"),
        (
            '{"payloadType": "t", "payload": "", "signatures": [{"keyid": "zz", "sig": ""}]}',
            "signature 1: keyid is not hex",
        ),
        (
            '{"payloadType": "t", "payload": "", "signatures": [{"keyid": ""}]}',
            "signature 1 has no 'sig' field",
        ),
    ],
)
def test_json_errors_are_clear(text: str, expect: str) -> None:
    with pytest.raises(ValueError, match=expect.replace("(", r"\(")):
        envelope_from_json(text)


def test_cosign_refuses_same_key(signed, bob) -> None:
    env = signed(bob)
    with pytest.raises(ValueError, match="already signed by this key"):
        cosign(env, bob.key)
    # Even with the key id hint removed, the signature itself gives it away.
    env.signatures[0].keyid = b""
    with pytest.raises(ValueError, match="a co-signature must come from a different key"):
        cosign(env, bob.key)


def test_cosign_does_not_modify_the_original(signed, alice, bob) -> None:
    env = signed(bob)
    two = cosign(env, alice.key)
    assert len(env.signatures) == 1 and len(two.signatures) == 2
    assert two.payload == env.payload


def test_public_key_line_parses_in_trust_store(alice) -> None:
    line = public_key_line(alice.key, "alice@laptop")
    assert line.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI")
    assert line.endswith(" alice@laptop")
    store = TrustStore.parse(f"alice admin {line}\n", "t")
    assert store.keys[0].raw == alice.key.public_key().public_bytes_raw()
    assert public_key_line(alice.key.public_key()) == line.rsplit(" ", 1)[0]
    with pytest.raises(ValueError, match="line break"):
        public_key_line(alice.key, "x\nmallory admin ssh-ed25519 AAAA")


def test_load_ssh_keygen_key(tmp_path: Path, ssh_keygen: str) -> None:
    path = _keygen(ssh_keygen, tmp_path / "id_ed25519", "")
    key = load_private_key(path)
    pub = (tmp_path / "id_ed25519.pub").read_text().split()
    assert public_key_line(key) == f"{pub[0]} {pub[1]}"
    # A passphrase set in the environment is harmless for an unencrypted key.
    assert load_private_key(path, b"unused").private_bytes_raw() == key.private_bytes_raw()


def test_load_encrypted_ssh_keygen_key(tmp_path: Path, ssh_keygen: str) -> None:
    path = _keygen(ssh_keygen, tmp_path / "id_ed25519", "correct horse")
    key = load_private_key(path, b"correct horse")
    assert isinstance(key, Ed25519PrivateKey)
    with pytest.raises(ValueError) as info:
        load_private_key(path)
    assert str(info.value) == f"key {path} is encrypted and no passphrase was given"
    with pytest.raises(ValueError, match="wrong passphrase or damaged key"):
        load_private_key(path, b"wrong")


def test_rsa_key_is_refused(tmp_path: Path, ssh_keygen: str) -> None:
    path = _keygen(ssh_keygen, tmp_path / "id_rsa", "", key_type="rsa")
    with pytest.raises(ValueError, match=r"is a RSAPrivateKey; agentd needs an Ed25519 key"):
        load_private_key(path)


def test_load_pyca_openssh_and_pem_keys(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    for name, fmt, enc in [
        ("openssh", serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        ("pkcs8", serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        (
            "pkcs8-enc",
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
    ]:
        path = tmp_path / name
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, enc))
        loaded = load_private_key(path, b"pw" if name.endswith("enc") else None)
        assert loaded.private_bytes_raw() == key.private_bytes_raw()
    with pytest.raises(ValueError, match="is encrypted and no passphrase was given"):
        load_private_key(tmp_path / "pkcs8-enc")


def test_load_errors_are_clear(tmp_path: Path, alice) -> None:
    with pytest.raises(ValueError, match=r"cannot read key .*missing: No such file"):
        load_private_key(tmp_path / "missing")
    pub = tmp_path / "id.pub"
    pub.write_text(public_key_line(alice.key) + "\n")
    with pytest.raises(ValueError, match="is a public key; give the private key"):
        load_private_key(pub)
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    with pytest.raises(ValueError, match="is not an OpenSSH or PEM private key"):
        load_private_key(junk)
    torn = tmp_path / "torn"
    torn.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match=rf"cannot load key {torn}"):
        load_private_key(torn)


def test_sign_serialises_once(command, bob) -> None:
    """The envelope carries exactly the bytes signed; verify never re-serialises."""
    cmd = command("kill")
    env = sign_command(cmd, bob.key)
    assert env.payload == cmd.SerializeToString()
