"""verify(): every way a command is refused, with real Ed25519 signatures."""

from __future__ import annotations

import hashlib

import pytest
from agentd.dsse import COMMAND_PAYLOAD_TYPE, keyid, pae
from agentd.signing import cosign, sign_command
from agentd.v1 import agentd_pb2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.auth import Limits, TrustStore, VerifiedCommand, verify
from daemon.errors import (
    AgentdError,
    BadSignature,
    EnvelopeTooLarge,
    Expired,
    InvalidArgument,
    MalformedCommand,
    NotYetValid,
    PermissionDenied,
    Unsigned,
    WrongAudience,
)


@pytest.fixture
def check(store: TrustStore, host: str, now: float, limits: Limits):
    """verify() against the alice/bob/carol store, for this host, at `now`."""

    def run(
        envelope: agentd_pb2.Envelope,
        action: str = "kill",
        *,
        at: float | None = None,
        trust: TrustStore | None = None,
        lim: Limits | None = None,
    ) -> VerifiedCommand:
        return verify(
            envelope,
            trust=store if trust is None else trust,
            audience=host,
            expected_action=action,
            now=now if at is None else at,
            limits=limits if lim is None else lim,
        )

    return run


def _resign(envelope: agentd_pb2.Envelope, key: Ed25519PrivateKey) -> agentd_pb2.Envelope:
    """Replace the signatures with one by `key` over the envelope's current bytes."""
    out = agentd_pb2.Envelope(payload=envelope.payload, payload_type=envelope.payload_type)
    out.signatures.add(
        keyid=keyid(key.public_key().public_bytes_raw()),
        sig=key.sign(pae(envelope.payload_type, envelope.payload)),
    )
    return out


# ------------------------------------------------------------------ accepted


@pytest.mark.parametrize("action", ["run", "stop", "kill"])
def test_good_command_verifies(action, check, signed, bob, now) -> None:
    env = signed(bob, action)
    v = check(env, action)
    assert v.action == action
    assert [k.principal for k in v.signers] == ["bob"]
    assert v.principals == ("bob",)
    assert v.authorized == v.signers
    assert v.payload_sha256 == hashlib.sha256(env.payload).digest()
    assert v.command_id == v.command.command_id and len(v.command_id) == 16
    assert v.issued_at == pytest.approx(now)
    assert v.expires_at == pytest.approx(now + 300)


def test_oncall_may_stop_and_kill(check, signed, carol) -> None:
    assert check(signed(carol, "stop"), "stop").principals == ("carol",)
    assert check(signed(carol, "kill"), "kill").principals == ("carol",)


def test_within_clock_skew_is_accepted(check, signed, bob, now) -> None:
    env = signed(bob, "kill")
    check(env, at=now - 59)  # issued 59 s "in the future"
    check(env, at=now + 300 + 59)  # expired 59 s ago


def test_maximum_lifetime_is_accepted(check, signed, bob, now) -> None:
    # Rounding to nanosecond timestamps must not push 300 s over the limit.
    env = signed(bob, "kill", now=now + 0.123456789, lifetime_s=300.0)
    assert check(env).expires_at - check(env).issued_at == pytest.approx(300.0)


def test_exactly_the_maximum_number_of_signatures_is_accepted(check, signed, bob) -> None:
    env = signed(bob)
    for _ in range(7):  # 8 in all; untrusted co-signers are ignored
        env = cosign(env, Ed25519PrivateKey.generate())
    assert len(env.signatures) == Limits().max_signatures == 8
    assert check(env).principals == ("bob",)


@pytest.mark.parametrize("at", [-60.0, 300.0 + 60.0], ids=["issued-at-skew", "expired-at-skew"])
def test_skew_edges_are_accepted(check, signed, bob, now, at: float) -> None:
    # Issued at now (whole seconds), expires at now + 300: exactly the skew off.
    check(signed(bob), at=now + at)


def test_one_millisecond_past_the_skew_is_refused(check, signed, bob, now) -> None:
    env = signed(bob)
    with pytest.raises(NotYetValid):
        check(env, at=now - 60.001)
    with pytest.raises(Expired):
        check(env, at=now + 300 + 60.001)


@pytest.mark.parametrize(("lifetime", "ok"), [
    (300.0, True), (300.0005, True),  # within the rounding allowance of 1 ms
    (300.002, False), (301.0, False),
])
def test_lifetime_edges(check, signed, bob, lifetime: float, ok: bool) -> None:
    env = signed(bob, lifetime_s=lifetime)
    if ok:
        check(env)
    else:
        with pytest.raises(InvalidArgument, match="exceeds the daemon's maximum of 300s"):
            check(env)


# ----------------------------------------------------------------- refused


def test_unsigned(check, command) -> None:
    env = agentd_pb2.Envelope(
        payload=command("kill").SerializeToString(), payload_type=COMMAND_PAYLOAD_TYPE
    )
    with pytest.raises(Unsigned, match="command is not signed; sign it with a key listed"):
        check(env)


def test_flipped_signature_byte(check, signed, bob) -> None:
    env = signed(bob)
    sig = bytearray(env.signatures[0].sig)
    sig[10] ^= 0x01
    env.signatures[0].sig = bytes(sig)
    with pytest.raises(BadSignature) as info:
        check(env)
    msg = info.value.message
    assert msg.startswith("no signature verifies under a trusted key (1 signature(s); key ids ")
    assert env.signatures[0].keyid[:2].hex() + "…" in msg
    assert msg.endswith("Is the signing key in the trust store?")


def test_role_not_allowed(check, signed, carol) -> None:
    with pytest.raises(PermissionDenied) as info:
        check(signed(carol, "run"), "run")
    assert info.value.message == (
        "run refused: signed by 'carol' (roles oncall), but run needs one of: admin, "
        "operator; have a key with such a role sign it"
    )


def test_expired(check, signed, bob, now) -> None:
    with pytest.raises(Expired) as info:
        check(signed(bob), at=now + 300 + 61)
    msg = info.value.message
    assert "command expired at 2025-06-15T15:11:40+00:00, 61s ago" in msg
    assert "sign a new command" in msg


def test_future_dated(check, signed, bob, now) -> None:
    with pytest.raises(NotYetValid) as info:
        check(signed(bob), at=now - 120)
    msg = info.value.message
    assert "issued 120s in the future" in msg
    assert "allowed clock skew of 60s" in msg
    assert "clock sync" in msg


def test_wrong_audience(check, signed, bob) -> None:
    with pytest.raises(WrongAudience) as info:
        check(signed(bob, audience="host-b"))
    assert info.value.message == (
        "command is addressed to host 'host-b' but this daemon is 'host-a'; "
        "get the host id from 'agentctl info'"
    )


def test_changed_payload_byte_fails_at_signature_before_parsing(check, signed, bob) -> None:
    env = signed(bob)
    # Make the payload unparsable too: the error must still be BadSignature,
    # proving the bytes were checked before they were parsed.
    env.payload = b"\xff" + env.payload[1:]
    with pytest.raises(BadSignature, match="no signature verifies"):
        check(env)
    env2 = signed(bob)
    body = bytearray(env2.payload)
    body[-1] ^= 0x01
    env2.payload = bytes(body)
    with pytest.raises(BadSignature):
        check(env2)


def test_oversized_envelope(check, command, bob) -> None:
    cmd = command("run")
    cmd.reason = "x" * 70_000
    env = sign_command(cmd, bob.key)
    with pytest.raises(EnvelopeTooLarge) as info:
        check(env, "run")
    assert f"envelope is {env.ByteSize()} bytes" in info.value.message
    assert "at most 65536 bytes" in info.value.message


def test_too_many_signatures(check, signed, bob) -> None:
    env = signed(bob)
    for _ in range(8):
        env = cosign(env, Ed25519PrivateKey.generate())
    with pytest.raises(InvalidArgument) as info:
        check(env)
    assert type(info.value) is InvalidArgument
    assert info.value.message == ("envelope carries 9 signatures; this daemon accepts at most 8")


def test_wrong_payload_type(check, signed, bob) -> None:
    env = signed(bob)
    env.payload_type = "application/vnd.in-toto+json"
    env = _resign(env, bob.key)
    with pytest.raises(MalformedCommand) as info:
        check(env)
    assert "payload type is 'application/vnd.in-toto+json', expected" in info.value.message
    assert COMMAND_PAYLOAD_TYPE in info.value.message


def test_action_mismatch(check, signed, bob) -> None:
    with pytest.raises(MalformedCommand) as info:
        check(signed(bob, "kill"), "stop")
    assert info.value.message == "envelope holds a 'kill' command but was sent to Stop"


def test_no_action(check, signed, bob) -> None:
    with pytest.raises(MalformedCommand, match="command names no action; expected a 'kill'"):
        check(signed(bob, "none"))


def test_lifetime_too_long(check, signed, bob, now) -> None:
    with pytest.raises(InvalidArgument) as info:
        check(signed(bob, lifetime_s=900.0))
    assert type(info.value) is InvalidArgument
    assert "lifetime 900s exceeds the daemon's maximum of 300s" in info.value.message


def test_expires_before_issued(check, command, bob) -> None:
    cmd = command("kill")
    cmd.expires_at.CopyFrom(cmd.issued_at)
    with pytest.raises(MalformedCommand, match="no later than it was issued"):
        check(sign_command(cmd, bob.key))


def test_missing_times(check, command, bob) -> None:
    cmd = command("kill")
    cmd.ClearField("expires_at")
    with pytest.raises(MalformedCommand, match="must set both issued_at and expires_at"):
        check(sign_command(cmd, bob.key))


def test_bad_command_id(check, command, bob) -> None:
    cmd = command("kill")
    cmd.command_id = b"short"
    with pytest.raises(MalformedCommand, match="command_id is 5 bytes, expected 16"):
        check(sign_command(cmd, bob.key))


def test_signed_garbage_payload(check, bob) -> None:
    env = agentd_pb2.Envelope(payload=b"\x12\x02\xff\xfe", payload_type=COMMAND_PAYLOAD_TYPE)
    env = _resign(env, bob.key)
    with pytest.raises(MalformedCommand, match="signed payload is not a valid Command"):
        check(env)


def test_unknown_fields_are_refused(check, command, bob) -> None:
    payload = command("kill").SerializeToString() + b"\x98\x01\x01"  # field 19, varint 1
    env = _resign(agentd_pb2.Envelope(payload=payload, payload_type=COMMAND_PAYLOAD_TYPE), bob.key)
    with pytest.raises(MalformedCommand, match=r"does not understand \(field numbers 19\)"):
        check(env)


@pytest.mark.parametrize("where", ["kill", "run.resources", "issued_at"])
def test_unknown_fields_nested_in_a_message_are_refused(check, command, bob,
                                                          where: str) -> None:
    """A restriction the daemon cannot read may sit at any depth: all are looked for."""
    action = "kill" if where == "issued_at" else where.split(".", maxsplit=1)[0]
    cmd = command(action)
    inner = cmd
    for name in where.split("."):
        inner = getattr(inner, name)
    inner.MergeFromString(b"\x98\x01\x01")  # field 19, varint 1: unknown there
    env = sign_command(cmd, bob.key)
    with pytest.raises(MalformedCommand, match=r"does not understand \(field numbers 19\)"):
        check(env, action)


@pytest.mark.parametrize(("field", "nanos"), [
    ("issued_at", 1_000_000_000), ("issued_at", -1), ("expires_at", 1_000_000_000),
    ("expires_at", -1),
])
def test_out_of_range_nanos_are_refused(check, command, bob, field: str, nanos: int) -> None:
    cmd = command("kill")
    getattr(cmd, field).nanos = nanos
    with pytest.raises(MalformedCommand) as info:
        check(sign_command(cmd, bob.key))
    assert info.value.message == f"{field} has nanos {nanos}, outside 0..999999999"


def test_largest_nanos_is_accepted(check, command, bob, now) -> None:
    cmd = command("kill")
    cmd.issued_at.nanos = 999_999_999
    assert check(sign_command(cmd, bob.key)).issued_at == pytest.approx(now + 1)


def test_repeated_signature_entry_counts_once(check, signed, bob) -> None:
    env = signed(bob)
    env.signatures.append(env.signatures[0])
    env.signatures.append(env.signatures[0])
    v = check(env)
    assert len(v.signers) == 1
    assert v.principals == ("bob",)


def test_same_key_signing_twice_counts_once(check, signed, bob) -> None:
    env = signed(bob)
    # Ed25519 is deterministic, so sign a second, different-looking entry
    # by the same key: an empty key id (the hint is optional).
    env.signatures.add(keyid=b"", sig=env.signatures[0].sig)
    v = check(env)
    assert [k.principal for k in v.signers] == ["bob"]


def test_two_keys_are_two_signers(check, signed, alice, carol) -> None:
    env = cosign(signed(carol, "run"), alice.key)
    v = check(env, "run")
    assert v.principals == ("alice", "carol")
    assert [k.principal for k in v.authorized] == ["alice"]


def test_the_keyid_picks_the_one_key_tried(check, signed, alice, bob) -> None:
    """A signature is checked against the key its id names, and no other."""
    env = signed(bob)
    assert check(env).principals == ("bob",)
    # Bob's signature labelled as Alice's: Alice's key does not verify it,
    # and Bob's is not tried.
    env.signatures[0].keyid = keyid(alice.key.public_key().public_bytes_raw())
    with pytest.raises(BadSignature):
        check(env)
    env.signatures[0].keyid = b"nonsense"
    with pytest.raises(BadSignature):
        check(env)


def test_a_keyid_never_makes_a_bad_signature_good(check, signed, bob) -> None:
    env = _resign(signed(bob), Ed25519PrivateKey.generate())
    env.signatures[0].keyid = keyid(bob.key.public_key().public_bytes_raw())
    with pytest.raises(BadSignature):
        check(env)


def test_a_keyless_flood_costs_no_verification(check, signed, bob, monkeypatch) -> None:
    """Eight garbage signatures naming no trusted key: refused before any Ed25519 work."""
    import importlib

    verify_mod = importlib.import_module("daemon.auth.verify")
    calls: list[int] = []
    real = verify_mod._signature_ok
    monkeypatch.setattr(verify_mod, "_signature_ok",
                        lambda *a: calls.append(1) or real(*a))  # type: ignore[func-returns-value]
    env = signed(bob)
    del env.signatures[:]
    for i in range(8):
        env.signatures.add(keyid=bytes([i]) * 32, sig=bytes(64))
    with pytest.raises(BadSignature):
        check(env)
    assert calls == []
    # One signature naming a trusted key: exactly one verification.
    check(signed(bob))
    assert calls == [1]


def test_unknown_key(check, signed, bob) -> None:
    stranger = Ed25519PrivateKey.generate()
    env = _resign(signed(bob), stranger)
    with pytest.raises(BadSignature, match=r"\(1 signature\(s\); key ids [0-9a-f]{4}…\)"):
        check(env)


def test_untrusted_cosigner_is_ignored(check, signed, bob) -> None:
    env = cosign(signed(bob), Ed25519PrivateKey.generate())
    assert check(env).principals == ("bob",)


def test_wrong_length_signature(check, signed, bob) -> None:
    env = signed(bob)
    env.signatures[0].sig = env.signatures[0].sig[:63]
    with pytest.raises(BadSignature) as info:
        check(env)
    assert info.value.message.startswith("signature 1 is 63 bytes but an Ed25519 signature is 64")


def test_empty_trust_store_trusts_nobody(check, signed, bob) -> None:
    with pytest.raises(BadSignature, match="Is the signing key in the trust store"):
        check(signed(bob), trust=TrustStore())


def test_only_agentd_errors_escape(check, bob) -> None:
    """Garbage in every field raises a domain error, never a library exception."""
    junk = [
        agentd_pb2.Envelope(),
        agentd_pb2.Envelope(payload=b"\x00" * 10, payload_type=COMMAND_PAYLOAD_TYPE),
        _resign(agentd_pb2.Envelope(payload=b"\x0a", payload_type=COMMAND_PAYLOAD_TYPE), bob.key),
        _resign(agentd_pb2.Envelope(payload=b"", payload_type=COMMAND_PAYLOAD_TYPE), bob.key),
    ]
    for env in junk:
        with pytest.raises(AgentdError):
            check(env)


def test_eight_garbage_signatures_naming_one_trusted_key_cost_one_verification(
        check, signed, bob, monkeypatch) -> None:
    import importlib

    verify_mod = importlib.import_module("daemon.auth.verify")
    calls: list[int] = []
    real = verify_mod._signature_ok
    monkeypatch.setattr(verify_mod, "_signature_ok",
                        lambda *a: calls.append(1) or real(*a))  # type: ignore[func-returns-value]
    env = signed(bob)
    bob_id = env.signatures[0].keyid
    del env.signatures[:]
    for _ in range(8):
        env.signatures.add(keyid=bob_id, sig=bytes(64))
    with pytest.raises(BadSignature):
        check(env)
    assert calls == [1]
