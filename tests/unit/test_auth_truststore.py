"""Trust store parsing, weak-key refusal and reloading, on real files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.auth import (
    InvalidKey,
    Role,
    TrustStore,
    TrustStoreFile,
    check_strong,
    parse_openssh_public_key,
)
from daemon.errors import TrustStoreError

SRC = "/etc/agentd/trusted_keys"
IDENTITY = b"\x01" + b"\x00" * 31
# y = -1: the point (0, -1) of order 2.
ORDER_TWO = ((2**255 - 19) - 1).to_bytes(32, "little")


def _good_key_text() -> str:
    from agentd.signing import public_key_line

    return public_key_line(Ed25519PrivateKey.generate())


def test_good_file_with_comments_and_blank_lines(alice, bob, carol) -> None:
    text = (
        "# agentd trust store\n"
        "\n"
        f"{alice.line()}\n"
        "   # an indented comment\n"
        f"{bob.line()}\n"
        f"{carol.principal} oncall,admin {_good_key_text()} two word comment\n"
    )
    store = TrustStore.parse(text, SRC)
    assert [k.principal for k in store.keys] == ["alice", "bob", "carol"]
    assert [k.line for k in store.keys] == [3, 5, 6]
    assert store.keys[0].roles == frozenset({Role.ADMIN})
    assert store.keys[2].roles == frozenset({Role.ONCALL, Role.ADMIN})
    assert store.keys[2].comment == "two word comment"
    alice_raw = alice.key.public_key().public_bytes_raw()
    assert store.keys[0].raw == alice_raw
    found = store.by_keyid(store.keys[0].keyid)
    assert found is not None and found.principal == "alice"
    assert store.by_keyid(b"\x00" * 32) is None


def test_empty_store_is_valid_and_trusts_nobody() -> None:
    store = TrustStore.parse("# nobody yet\n\n", SRC)
    assert len(store) == 0


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ("alice admin", "expected 'PRINCIPAL ROLES ssh-ed25519 BASE64KEY [COMMENT]'"),
        ("-alice admin {key}", "principal '-alice' is not valid"),
        ("al!ce admin {key}", "principal 'al!ce' is not valid"),
        ("a" * 65 + " admin {key}", "is not valid; use 1-64 characters"),
        ("alice root {key}", "unknown role 'root'; known roles are admin, operator, oncall"),
        ("alice admin,,oncall {key}", "has an empty entry"),
        ("alice admin, {key}", "has an empty entry"),
        ("alice oncall,oncall {key}", "role 'oncall' is listed twice"),
        ("alice admin ssh-rsa AAAAB3NzaC1yc2E", "key type 'ssh-rsa' is not supported; only"),
        ("alice admin ssh-ed25519 not*base64", "not valid base64"),
        ("alice admin ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7", "holds a 'ssh-rsa' key"),
        ("alice admin ssh-ed25519 AAAA", "too short to be an SSH key"),
        ("alice admin ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA", "cannot be parsed"),
        ("alice admin ssh-ed25519 AAAAD3NzaC1lZDI1NTE5", "truncated"),
        ("alice admin ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "cannot be parsed"),
    ],
)
def test_malformed_line_names_file_and_line(line: str, expect: str) -> None:
    text = f"# header\nbob admin {_good_key_text()}\n{line.format(key=_good_key_text())}\n"
    with pytest.raises(TrustStoreError) as info:
        TrustStore.parse(text, SRC)
    assert info.value.message.startswith(f"trust store {SRC} line 3: ")
    assert expect in info.value.message
    assert "\n" not in info.value.message


def test_rsa_key_message_is_exact() -> None:
    with pytest.raises(TrustStoreError) as info:
        TrustStore.parse("\n\nalice admin ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7\n", "/x/k")
    assert info.value.message == (
        "trust store /x/k line 3: key type 'ssh-rsa' is not supported; only ssh-ed25519"
    )


def test_same_key_under_two_principals_is_refused() -> None:
    key = _good_key_text()
    text = f"alice admin {key}\n# comment\nmallory oncall {key} copy\n"
    with pytest.raises(TrustStoreError) as info:
        TrustStore.parse(text, SRC)
    msg = info.value.message
    assert msg.startswith(f"trust store {SRC} line 3: ")
    assert "already trusted on line 1 (principal 'alice')" in msg
    assert "remove one of the two lines" in msg


def test_identity_point_key_is_refused(raw_key_line: Callable[[bytes], str]) -> None:
    line = raw_key_line(IDENTITY)
    # The form the brief describes: the ed25519 prefix, then 01 00..00.
    assert line.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI")
    with pytest.raises(TrustStoreError) as info:
        TrustStore.parse(f"mallory admin {line}\n", SRC)
    assert info.value.message.startswith(f"trust store {SRC} line 1: ")
    assert "weak Ed25519 point" in info.value.message
    assert "ssh-keygen -t ed25519" in info.value.message


def test_identity_point_really_forges_under_pyca() -> None:
    """Why check_strong exists: pyca accepts (R = identity, S = 0) under the identity key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(IDENTITY).verify(IDENTITY + b"\x00" * 32, b"rm -rf /")
    with pytest.raises(InvalidKey):
        check_strong(IDENTITY)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(ORDER_TWO, id="order-2"),
        pytest.param(b"\x00" * 32, id="order-4"),
        pytest.param((2**255 - 19 + 1).to_bytes(32, "little"), id="non-canonical-identity"),
    ],
)
def test_other_weak_points_are_refused(raw: bytes, raw_key_line: Callable[[bytes], str]) -> None:
    with pytest.raises(TrustStoreError, match=r"line 2: .*weak Ed25519 point"):
        TrustStore.parse(f"\nmallory admin {raw_key_line(raw)}\n", SRC)


def test_mixed_order_point_is_refused(raw_key_line: Callable[[bytes], str]) -> None:
    good = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    mixed = nacl.bindings.crypto_core_ed25519_add(good, ORDER_TWO)
    with pytest.raises(TrustStoreError, match="outside the prime-order subgroup"):
        TrustStore.parse(f"mallory admin {raw_key_line(mixed)}\n", SRC)


def test_parse_openssh_public_key_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    raw = parse_openssh_public_key(_pub(key) + " comment here")
    assert raw == key.public_key().public_bytes_raw()
    check_strong(raw)


def test_check_strong_refuses_wrong_length() -> None:
    with pytest.raises(InvalidKey, match="31 bytes, not 32"):
        check_strong(b"\x05" * 31)


# ---------------------------------------------------------------- the file


def test_file_loads_and_is_cached(write_file, alice) -> None:
    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    first = ts.current()
    assert [k.principal for k in first.keys] == ["alice"]
    assert first.source == str(path)
    assert ts.current() is first  # unchanged file: no re-parse


def test_file_reloads_after_edit(write_file, alice, bob) -> None:
    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    assert [k.principal for k in ts.current().keys] == ["alice"]
    # An admin removes alice's (compromised) key and adds bob's.
    path.write_text(bob.line() + "\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert [k.principal for k in ts.current().keys] == ["bob"]


def test_file_replaced_by_rename_is_reloaded(write_file, alice, bob, tmp_path: Path) -> None:
    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    ts.current()
    new = write_file(bob.line() + "\n", name="trusted_keys.new")
    new.replace(path)
    assert [k.principal for k in ts.current().keys] == ["bob"]


def test_broken_edit_fails_closed_not_back_to_old(write_file, alice) -> None:
    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    ts.current()
    path.write_text(alice.line() + "\nbroken line\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    for _ in range(2):  # the cached error is raised again, as the same error class
        with pytest.raises(TrustStoreError, match=rf"trust store {path} line 2: expected"):
            ts.current()
    # Fixing the file brings it back.
    path.write_text(alice.line() + "\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert len(ts.current()) == 1


def test_group_writable_file_is_refused(write_file, alice) -> None:
    path = write_file(alice.line() + "\n", mode=0o664)
    ts = TrustStoreFile(path)
    with pytest.raises(TrustStoreError) as info:
        ts.current()
    msg = info.value.message
    assert "writable by group or others (mode 0664)" in msg
    assert f"chmod go-w {path}" in msg
    path.chmod(0o644)  # chmod changes st_ctime: picked up at once
    assert len(ts.current()) == 1


def test_world_writable_file_is_refused(write_file, alice) -> None:
    path = write_file(alice.line() + "\n", mode=0o602)
    with pytest.raises(TrustStoreError, match="chmod go-w"):
        TrustStoreFile(path).current()


def test_missing_file_is_refused(tmp_path: Path, write_file, alice) -> None:
    path = tmp_path / "trusted_keys"
    ts = TrustStoreFile(path)
    with pytest.raises(TrustStoreError) as info:
        ts.current()
    assert str(path) in info.value.message
    assert "No such file or directory" in info.value.message
    assert "every signed command is refused" in info.value.message
    write_file(alice.line() + "\n")
    assert len(ts.current()) == 1


def test_file_deleted_after_load_is_refused(write_file, alice) -> None:
    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    ts.current()
    path.unlink()
    with pytest.raises(TrustStoreError, match="cannot be read"):
        ts.current()


def test_directory_instead_of_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trusted_keys"
    path.mkdir(mode=0o755)
    with pytest.raises(TrustStoreError, match="is not a regular file"):
        TrustStoreFile(path).current()


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "trusted_keys"
    os.mkfifo(path, 0o600)
    with pytest.raises(TrustStoreError, match="is not a regular file"):
        TrustStoreFile(path).current()


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trusted_keys"
    path.write_bytes(b"alice admin \xff\n")
    path.chmod(0o600)
    with pytest.raises(TrustStoreError, match="is not UTF-8 text"):
        TrustStoreFile(path).current()


def _pub(key: Ed25519PrivateKey) -> str:
    from agentd.signing import public_key_line

    return public_key_line(key)


def test_concurrent_readers_see_whole_versions(write_file, alice, bob) -> None:
    """Readers racing an admin who swaps the file see one version or the other."""
    import threading

    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    seen: set[tuple[str, ...]] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(tuple(k.principal for k in ts.current().keys))
            except BaseException as err:  # collected and asserted below
                errors.append(err)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        who = bob if i % 2 else alice
        write_file(who.line() + "\n", name="trusted_keys.new").replace(path)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert seen <= {("alice",), ("bob",)}
    assert ts.current().keys[0].principal == "bob"  # the last version written (i = 199)


def test_trusted_key_equality_is_by_raw_key(alice) -> None:
    line = f"alice admin {_pub(alice.key)}\n"
    a = TrustStore.parse(line, "a").keys[0]
    b = TrustStore.parse(line, "b").keys[0]
    assert a == b and hash(a) == hash(b)
    assert a.public_key is not b.public_key


def test_a_stop_falls_back_to_the_last_good_store_and_nothing_else_does(
        write_file, alice, bob) -> None:
    path = write_file(alice.line() + "\n")
    ts = TrustStoreFile(path)
    assert ts.for_stop() == (ts.current(), "")
    path.write_text(alice.line() + "\n" + bob.line() + "\nbroken line\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(TrustStoreError):
        ts.current()
    store, why = ts.for_stop()
    assert [k.principal for k in store] == ["alice"]  # the last good version, not the edit
    assert f"trust store {path} line 3" in why


def test_no_fallback_when_no_version_ever_loaded(write_file, alice) -> None:
    path = write_file("broken line\n")
    with pytest.raises(TrustStoreError):
        TrustStoreFile(path).for_stop()
