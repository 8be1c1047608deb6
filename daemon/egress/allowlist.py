"""The egress allowlist: its grammar, canonical host names, and matching.

An entry is `NAME:PORTS`, `*.SUFFIX:PORTS` or `CIDR:PORTS`; PORTS is `443`
or `8000-8999`, and always required. IPv6 goes in brackets
(`[2001:db8::/32]:443`); a bare address is a /32 or /128 network.

Every name, whether an admin wrote it in a policy or an agent put it in an
SNI or a Host header, goes through canonical_name() before any comparison:
lower case, IDNA 2008 A-labels, no trailing dot. What cannot be put in that
form (a NUL, a space, a control character, an empty label) is refused
rather than cleaned up: a name that the proxy and the far end could read
differently is the hole (sandbox-runtime's `evil\\0.allowed.com`, issue 13).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_NAME = 253  # RFC 1035 2.3.4: 255 octets on the wire, 253 as text without the root dot
_MAX_LABEL = 63
# After IDNA every label is letters, digits and inner hyphens (RFC 5890's
# LDH rule). No underscore: it is not valid in a host name (RFC 952/1123),
# and one more accepted byte is one more chance for two parsers to disagree.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_ODD_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zs", "Zl", "Zp"})
_PORT = re.compile(r"[0-9]{1,5}\Z")


@dataclass(frozen=True)
class Entry:
    """One allowlist entry, in canonical form."""

    text: str  # canonical text, e.g. "api.anthropic.com:443", "10.1.2.0/24:5432"
    host: str | None  # canonical name, without "*."; None for a network entry
    wildcard: bool  # "*.suffix": any name strictly under suffix, not suffix itself
    network: IPNetwork | None
    ports: tuple[int, int]  # inclusive

    def has_port(self, port: int) -> bool:
        return self.ports[0] <= port <= self.ports[1]

    def matches_name(self, name: str) -> bool:
        """Whether canonical `name` is this entry's name (any port)."""
        if self.host is None:
            return False
        if self.wildcard:
            return name.endswith("." + self.host)
        return name == self.host

    def covers(self, other: Entry) -> bool:
        """Whether everything `other` allows, this entry allows too."""
        if not (self.ports[0] <= other.ports[0] and other.ports[1] <= self.ports[1]):
            return False
        if self.network is not None or other.network is not None:
            if self.network is None or other.network is None:
                return False
            if self.network.version != other.network.version:
                return False
            return other.network.subnet_of(self.network)  # type: ignore[arg-type]
        assert self.host is not None and other.host is not None
        if not self.wildcard:
            return not other.wildcard and other.host == self.host
        # *.a.com covers x.a.com and *.x.a.com and *.a.com, never a.com itself.
        return other.host.endswith("." + self.host) or (other.wildcard and other.host == self.host)


def _ascii_label_ok(label: str) -> bool:
    return bool(_LDH_LABEL.match(label))


def canonical_name(name: str | bytes) -> str:
    """The canonical form of a host name: lower case, IDNA 2008 A-labels, no trailing dot.

    Bytes (from the wire: SNI, Host, a DNS question, CONNECT) must be ASCII;
    a str may hold Unicode (a policy may say `bücher.example`), mapped by
    UTS 46 then encoded. Raises ValueError, saying why, for NUL or any other
    byte outside letters, digits, '-' and '.', an empty label, a label over
    63 or a name over 253 characters, or an IDNA failure.
    """
    if len(name) > 4 * _MAX_NAME:
        # Bound the work (and the message, which quotes agent bytes) first.
        raise ValueError(f"name of {len(name)} characters is longer than {_MAX_NAME}")
    if isinstance(name, bytes):
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"name {name[:64]!r} has non-ASCII bytes (names on the wire "
                             "are A-labels)") from None
    else:
        text = name
    if not text:
        raise ValueError("empty name")
    if len(text) > 4 * _MAX_NAME:
        # Bound the work (and the message) before IDNA sees a huge string.
        raise ValueError(f"name of {len(text)} characters is longer than {_MAX_NAME}")
    # Control characters, spaces, NUL: refused before any mapping, so that
    # UTS 46 never gets to turn them into something that matches.
    # Format characters (zero-width, bidi) and private or unassigned code
    # points too: a name an operator cannot read as written is not allowed.
    for ch in text:
        if ord(ch) < 0x21 or unicodedata.category(ch) in _ODD_CATEGORIES:
            raise ValueError(f"name {text[:64]!r} holds the control, space or invisible "
                             f"character {ch!r}")
    if text.endswith("."):
        text = text[:-1]  # the root: "example.com." is "example.com"
    if text.isascii():
        labels = text.lower().split(".")
        for label in labels:
            if not label:
                raise ValueError(f"name {text!r} has an empty label")
            if len(label) > _MAX_LABEL:
                raise ValueError(f"name {text!r} has a label longer than {_MAX_LABEL}")
            if not _ascii_label_ok(label):
                raise ValueError(f"name {text!r}: label {label!r} may hold only letters, "
                                 "digits and inner hyphens")
            if label.startswith("xn--"):
                _check_a_label(text, label)
        out = ".".join(labels)
    else:
        if "" in text.split("."):
            raise ValueError(f"name {text!r} has an empty label")
        try:
            out = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as err:
            raise ValueError(f"name {text!r} is not a valid IDNA 2008 name: {err}") from None
        for label in out.split("."):
            if not _ascii_label_ok(label):
                raise ValueError(f"name {text!r} maps to {out!r}, whose label {label!r} "
                                 "is not a host name label")
    if len(out) > _MAX_NAME:
        raise ValueError(f"name {out[:40]!r}... is longer than {_MAX_NAME} characters")
    return out


def _check_a_label(text: str, label: str) -> None:
    # A bogus "xn--" label would never match a real one, but a policy holding
    # one is a typo worth an error, and a wire name holding one is odd.
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError) as err:
        raise ValueError(f"name {text!r}: {label!r} is not a valid A-label: {err}") from None


def _parse_ports(entry: str, text: str) -> tuple[int, int]:
    lo_s, dash, hi_s = text.partition("-")
    if not dash:
        hi_s = lo_s
    if not (_PORT.match(lo_s) and _PORT.match(hi_s)):
        raise ValueError(f"allow entry {entry!r}: port {text!r} is not a number or a range "
                         "like 8000-8999")
    lo, hi = int(lo_s), int(hi_s)
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ValueError(f"allow entry {entry!r}: port {p} is outside 1-65535")
    if lo > hi:
        raise ValueError(f"allow entry {entry!r}: port range {text!r} runs backwards "
                         f"(write {hi}-{lo})")
    return lo, hi


def _ports_text(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


def _parse_network(entry: str, text: str, bracketed: bool) -> IPNetwork:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        if "host bits set" in str(err):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"allow entry {entry!r}: {text} has host bits set "
                             f"(did you mean {loose}?)") from None
        raise ValueError(f"allow entry {entry!r}: {text!r} is not an address or a "
                         "network") from None
    if net.version == 6 and not bracketed:
        raise ValueError(f"allow entry {entry!r}: put IPv6 in brackets, like "
                         f"[{text}]:443")
    if net.version == 4 and bracketed:
        raise ValueError(f"allow entry {entry!r}: brackets are for IPv6 only")
    return net


def _network_text(net: IPNetwork) -> str:
    full = net.prefixlen == net.max_prefixlen
    addr = str(net.network_address) if full else str(net)
    return f"[{addr}]" if net.version == 6 else addr


def _looks_numeric(host: str) -> bool:
    # inet_aton(3) reads "10.1", "0x7f.1" and "2130706433" as addresses: a name
    # whose last label is a number is one a resolver may treat as an address.
    last = host.rsplit(".", 1)[-1]
    return last.isdigit() or bool(re.fullmatch(r"0x[0-9a-f]+", last))


def parse_entry(entry: str) -> Entry:
    """One entry in canonical form. Raises ValueError("allow entry 'x': why")."""
    raw = entry.strip()
    if not raw:
        raise ValueError(f"allow entry {entry!r}: empty")
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0 or raw[close + 1: close + 2] != ":":
            raise ValueError(f"allow entry {entry!r}: write IPv6 as [ADDR/PREFIX]:PORT")
        net = _parse_network(entry, raw[1:close], bracketed=True)
        ports = _parse_ports(entry, raw[close + 2:])
        return Entry(f"{_network_text(net)}:{_ports_text(ports)}", None, False, net, ports)
    host_s, colon, port_s = raw.rpartition(":")
    if not colon:
        raise ValueError(f"allow entry {entry!r}: no port; add one, e.g. '{raw}:443'")
    if ":" in host_s:
        raise ValueError(f"allow entry {entry!r}: put IPv6 in brackets, like "
                         f"[{host_s}]:{port_s}")
    ports = _parse_ports(entry, port_s)
    if host_s and (host_s[0].isdigit() or "/" in host_s):
        try:
            net = ipaddress.ip_network(host_s, strict=False)
        except ValueError:
            pass
        else:
            net = _parse_network(entry, host_s, bracketed=False)
            return Entry(f"{_network_text(net)}:{_ports_text(ports)}", None, False, net, ports)
    wildcard = host_s.startswith("*.")
    name = host_s[2:] if wildcard else host_s
    if "*" in name:
        raise ValueError(f"allow entry {entry!r}: '*' is allowed only as a leading '*.' "
                         "(e.g. '*.example.com:443')")
    try:
        host = canonical_name(name)
    except ValueError as err:
        raise ValueError(f"allow entry {entry!r}: {err}") from None
    if _looks_numeric(host):
        raise ValueError(f"allow entry {entry!r}: {host!r} reads as an IP address; write "
                         "a CIDR such as 192.0.2.0/24:443")
    if wildcard and "." not in host:
        raise ValueError(f"allow entry {entry!r}: a wildcard must name a domain under a "
                         f"top-level domain, not all of '.{host}'")
    text = f"{'*.' if wildcard else ''}{host}:{_ports_text(ports)}"
    return Entry(text, host, wildcard, None, ports)


def parse(entries: Iterable[str]) -> tuple[Entry, ...]:
    """Every entry in canonical form, duplicates dropped, in order. Raises ValueError."""
    if isinstance(entries, str):
        raise TypeError("parse() takes a list of entries, not one string")
    out: dict[str, Entry] = {}
    for text in entries:
        e = parse_entry(text)
        out.setdefault(e.text, e)
    return tuple(out.values())


def _plain(addr: IPAddress) -> IPAddress:
    # ::ffff:10.0.0.1 is 10.0.0.1: judge it by the IPv4 rules, or a mapped
    # address would slip past every IPv4 CIDR and private range.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Allowlist:
    """An immutable allowlist. Names given to it must already be canonical."""

    entries: tuple[Entry, ...] = field(default=())

    @classmethod
    def of(cls, texts: Iterable[str]) -> Allowlist:
        """Parse texts into an Allowlist. Raises ValueError."""
        return cls(parse(texts))

    def allows_name(self, name: str, port: int) -> bool:
        return any(e.matches_name(name) and e.has_port(port) for e in self.entries)

    def name_entries(self, name: str) -> tuple[Entry, ...]:
        """The entries naming `name`, whatever their port (for DNS, and for reasons)."""
        return tuple(e for e in self.entries if e.matches_name(name))

    def allows_addr(self, addr: IPAddress, port: int) -> bool:
        """Whether a CIDR entry allows addr:port. Name entries never allow an address."""
        a = _plain(addr)
        return any(e.network is not None and e.network.version == a.version
                   and a in e.network and e.has_port(port) for e in self.entries)

    def names_addr(self, addr: IPAddress) -> bool:
        """Whether a CIDR entry names addr on any port (a private range it exempts)."""
        a = _plain(addr)
        return any(e.network is not None and e.network.version == a.version
                   and a in e.network for e in self.entries)

    def texts(self) -> list[str]:
        return [e.text for e in self.entries]

    def covers(self, other: Allowlist) -> bool:
        """Whether every entry of other lies within one entry of this list.

        Conservative: an entry covered only by the union of several (ports
        1-10 and 11-20 against 1-20) counts as not covered, so the caller
        asks for an escalation it might not strictly need, never the reverse.
        """
        return all(any(mine.covers(e) for mine in self.entries) for e in other.entries)
