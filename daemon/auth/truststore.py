"""The trust store: which Ed25519 keys may sign commands, and in which roles.

File format, one key a line (blank lines and lines starting with '#' are
ignored):

    PRINCIPAL ROLES ssh-ed25519 BASE64KEY [COMMENT...]

for example `alice admin,oncall ssh-ed25519 AAAAC3Nza... alice@laptop`.
Parsing is strict: one bad line refuses the whole file, because a half-loaded
trust store is a trust store nobody reviewed.
"""

from __future__ import annotations

import enum
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from agentd.dsse import keyid as _keyid
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.auth.keys import KEY_TYPE, InvalidKey, check_strong, parse_openssh_public_key
from daemon.errors import TrustStoreError

_PRINCIPAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_FORMAT = "PRINCIPAL ROLES ssh-ed25519 BASE64KEY [COMMENT]"
# How often a read is retried when the file changes while it is being read.
_READ_ATTEMPTS = 3


class Role(enum.StrEnum):
    """A role a key may hold. policy.ACTION_ROLES says what each may do.

    Parsing accepts exactly the members listed here, so a new role is one
    line here plus its entries in policy.ACTION_ROLES.
    """

    ADMIN = "admin"
    OPERATOR = "operator"
    ONCALL = "oncall"
    # For control planes: may renew leases and stop, never run.
    SUPERVISOR = "supervisor"


@dataclass(frozen=True)
class TrustedKey:
    """One line of the trust store: a principal's key and its roles."""

    principal: str
    roles: frozenset[Role]
    # Compared and hashed through `raw`: pyca key objects are not the identity.
    public_key: Ed25519PublicKey = field(compare=False, repr=False)
    raw: bytes
    keyid: bytes
    comment: str
    line: int

    def roles_text(self) -> str:
        """The roles as the trust store spells them, sorted: `admin,oncall`."""
        return ",".join(sorted(self.roles)) or "(none)"

    @classmethod
    def from_raw(
        cls, principal: str, roles: frozenset[Role], raw: bytes, comment: str = "", line: int = 0
    ) -> TrustedKey:
        """Build a TrustedKey from a raw 32-byte public key.

        Raises InvalidKey if the key is weak (see keys.check_strong).
        """
        check_strong(raw)
        return cls(
            principal=principal,
            roles=roles,
            public_key=Ed25519PublicKey.from_public_bytes(raw),
            raw=raw,
            keyid=_keyid(raw),
            comment=comment,
            line=line,
        )


@dataclass(frozen=True)
class TrustStore:
    """An immutable set of trusted keys, indexed by key id.

    Each raw key appears at most once, so a key id names at most one key.
    """

    keys: tuple[TrustedKey, ...] = ()
    source: str = "<memory>"
    _by_keyid: Mapping[bytes, TrustedKey] = field(
        init=False, repr=False, compare=False, default_factory=lambda: MappingProxyType({})
    )

    def __post_init__(self) -> None:
        index: dict[bytes, TrustedKey] = {}
        for key in self.keys:
            if key.keyid in index:
                raise TrustStoreError(
                    f"trust store {self.source}: key of {key.principal!r} appears twice"
                )
            index[key.keyid] = key
        object.__setattr__(self, "_by_keyid", MappingProxyType(index))

    def by_keyid(self, keyid: bytes) -> TrustedKey | None:
        """The key whose id is `keyid`, or None."""
        return self._by_keyid.get(keyid)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self.keys)

    @classmethod
    def parse(cls, text: str, source: str) -> TrustStore:
        """Parse trust-store text; `source` names the file in error messages.

        Raises TrustStoreError naming the source and line number for a
        malformed line, an unknown, empty or repeated role, an unsupported or
        weak key, or a key that appears on two lines (even under two
        principals). An empty store is valid: it trusts nobody.
        """
        keys: list[TrustedKey] = []
        seen: dict[bytes, TrustedKey] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            key = _parse_line(stripped, source, number)
            earlier = seen.get(key.raw)
            if earlier is not None:
                raise _line_error(
                    source,
                    number,
                    f"this key is already trusted on line {earlier.line} "
                    f"(principal {earlier.principal!r}); a key may appear only once, "
                    "so remove one of the two lines",
                )
            seen[key.raw] = key
            keys.append(key)
        return cls(keys=tuple(keys), source=source)


class TrustStoreFile:
    """A trust store file, re-read when it changes. Thread-safe.

    The daemon picks up an edited trust store without a restart: current()
    costs one stat() while the file is unchanged.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._store: TrustStore | None = None
        self._error: TrustStoreError | None = None
        # The last version that loaded: stops only (for_stop()).
        self._last_good: TrustStore | None = None

    def current(self) -> TrustStore:
        """The trust store as the file says now.

        Raises TrustStoreError when the file is missing, unreadable, not a
        regular file, writable by group or others, or malformed. There is no
        fallback to an earlier version: an admin who removed a compromised key
        must not find it still trusted. A broken file's error is cached until
        the file changes, so it is not re-parsed on every command.
        """
        try:
            st = os.stat(self.path)
        except OSError as err:
            with self._lock:
                self._stamp, self._store, self._error = None, None, None
            raise TrustStoreError(
                f"trust store {self.path} cannot be read: {err.strerror}; "
                "every signed command is refused until it is fixed"
            ) from err
        with self._lock:
            if self._stamp != _stamp(st):
                self._reload(st)
            if self._error is not None:
                # A fresh exception each time: re-raising one object would
                # grow its traceback on every call.
                raise TrustStoreError(self._error.message)
            assert self._store is not None
            return self._store

    def for_stop(self) -> tuple[TrustStore, str]:
        """The store for a stop, kill, estop or freeze: current(), or the last good one.

        Returns (store, why): why is "" when the file is good, else what is
        wrong with it (the caller records that the last good version served).
        A broken edit must not take away the on-call engineer's kill; a key
        the broken edit meant to remove can then still stop agents, which
        only ever makes the host safer. Everything that starts or loosens
        gets no such fallback. Raises TrustStoreError if no version ever
        loaded.
        """
        try:
            return self.current(), ""
        except TrustStoreError as err:
            with self._lock:
                last = self._last_good
            if last is None:
                raise
            return last, err.message

    def _reload(self, st: os.stat_result) -> None:
        """Load the file into _store or _error, stamped with the version read.

        A failure is stamped with `st`, the stat that prompted the reload, so
        the same broken file is not read again until it changes (a chmod
        changes st_ctime).
        """
        try:
            stamp, text = _read(self.path)
        except TrustStoreError as err:
            self._stamp, self._store, self._error = _stamp(st), None, err
            return
        self._stamp = stamp
        try:
            self._store, self._error = TrustStore.parse(text, str(self.path)), None
            self._last_good = self._store
        except TrustStoreError as err:
            self._store, self._error = None, err


def _read(path: Path) -> tuple[tuple[int, int, int, int], str]:
    """Read the trust store and the stamp of the version read.

    Raises TrustStoreError if the file cannot be read, is not a regular file,
    is writable by group or others, is not UTF-8, or keeps changing.
    """
    for _ in range(_READ_ATTEMPTS):
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the
            # command path; _check_mode refuses it before any read.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                before = os.fstat(fd)
                _check_mode(path, before)
                data = _read_all(fd)
                after = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise TrustStoreError(
                f"trust store {path} cannot be read: {err.strerror}; "
                "every signed command is refused until it is fixed"
            ) from err
        # An edit that lands while we read would leave us a torn mix of old
        # and new; the stamp changes, so read again.
        if _stamp(before) == _stamp(after):
            try:
                return _stamp(after), data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TrustStoreError(
                    f"trust store {path} is not UTF-8 text (byte {err.start}); re-save it as UTF-8"
                ) from err
    raise TrustStoreError(f"trust store {path} kept changing while it was read; try again")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _check_mode(path: Path, st: os.stat_result) -> None:
    """Refuse a file that is not regular or that group or others may write."""
    if not stat.S_ISREG(st.st_mode):
        raise TrustStoreError(f"trust store {path} is not a regular file")
    # Like sshd's StrictModes: whoever can write the file can grant
    # themselves any role.
    if st.st_mode & 0o022:
        raise TrustStoreError(
            f"trust store {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod go-w {path}'"
        )


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime catches a chmod and an edit that restores the mtime; the inode
    # catches a replace-by-rename. File timestamps tick at the kernel's coarse
    # clock (a few ms), so two same-size edits within one tick that also reuse
    # the inode number could go unnoticed until the next edit; human edits
    # are not that fast.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse_line(line: str, source: str, number: int) -> TrustedKey:
    """Parse one non-blank, non-comment line. Raises TrustStoreError."""
    fields = line.split(None, 4)
    if len(fields) < 4:
        raise _line_error(source, number, f"expected '{_FORMAT}' but found {len(fields)} field(s)")
    principal, roles_text, key_type, key_b64 = fields[:4]
    comment = fields[4] if len(fields) == 5 else ""
    if not _PRINCIPAL.fullmatch(principal):
        raise _line_error(
            source,
            number,
            f"principal {principal[:70]!r} is not valid; use 1-64 characters from "
            "A-Z a-z 0-9 . _ @ - starting with a letter or digit",
        )
    roles = _parse_roles(roles_text, source, number)
    if key_type != KEY_TYPE:
        raise _line_error(
            source, number, f"key type {key_type[:40]!r} is not supported; only {KEY_TYPE}"
        )
    try:
        raw = parse_openssh_public_key(f"{key_type} {key_b64}")
        return TrustedKey.from_raw(principal, roles, raw, comment, number)
    except InvalidKey as err:
        raise _line_error(source, number, str(err)) from err


def _parse_roles(text: str, source: str, number: int) -> frozenset[Role]:
    """Parse `admin,oncall`. Raises TrustStoreError for unknown, empty or repeated roles."""
    known = ", ".join(r.value for r in Role)
    roles: list[Role] = []
    for name in text.split(","):
        if not name:
            raise _line_error(
                source, number, f"roles {text[:70]!r} has an empty entry; use e.g. 'admin,oncall'"
            )
        try:
            role = Role(name)
        except ValueError:
            raise _line_error(
                source, number, f"unknown role {name[:40]!r}; known roles are {known}"
            ) from None
        if role in roles:
            raise _line_error(source, number, f"role {name!r} is listed twice")
        roles.append(role)
    return frozenset(roles)


def _line_error(source: str, number: int, what: str) -> TrustStoreError:
    return TrustStoreError(f"trust store {source} line {number}: {what}")
