"""The one host matcher (DESIGN §2): exact host:port > exact host > longest wildcard > IP/CIDR.

Lookups cost the same with ten rules or ten thousand: exact rules live in dicts, wildcards are
found by walking the label suffixes of the queried name, and networks are grouped by prefix
length so a lookup is one dict probe per distinct prefix length present.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from enum import IntEnum
from typing import Generic, NamedTuple, TypeVar

from gateway.policy.addresses import canonical_ip, ends_in_number, parse_ip

T = TypeVar("T")

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class PatternKind(IntEnum):
    """Ordered by precedence: a lower value is more specific."""

    HOSTPORT = 0
    HOST = 1
    WILDCARD = 2
    NETWORK = 3


class HostPattern(NamedTuple):
    """A parsed rule key. Immutable; a named tuple, not a frozen dataclass, since a large
    config builds 200,000 of them and this is built in a third of the time."""

    kind: PatternKind
    text: str
    host: str = ""
    port: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def __str__(self) -> str:
        return self.text


# A string that could be an IP literal: IPv4 is digits and dots, IPv6 has a colon.
_MAYBE_IP = re.compile(r"[0-9.]+$|.*:")
# An already-normal ASCII name (the common case), checked in one pass.
_ASCII_NAME = re.compile(r"(?:[a-z0-9_][a-z0-9_-]{0,62}\.)*[a-z0-9_][a-z0-9_-]{0,62}")
# The shape of most rule keys: a lowercase ASCII name, maybe with a port.
_KEY_SHAPE = re.compile(rf"({_ASCII_NAME.pattern})(?::([0-9]+))?")
_IPV4_SHAPE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


@functools.lru_cache(maxsize=4096)
def normalise_host(host: str) -> str:
    """Lowercase, strip one trailing dot and IPv6 brackets, IDNA-encode.

    Raises ValueError for names that cannot be a DNS host name. Cached: every request
    normalises the same few names, and the IP-literal probe alone costs microseconds.
    """
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.endswith("."):
        h = h[:-1]
    if not h:
        raise ValueError("empty host")
    if ":" in h or ends_in_number(h):  # only these can be IP literals: skip the costly parse
        ip = canonical_ip(h, brackets=False, zone=False, unmap=True)
        if ip is not None:
            return str(ip)
        if ":" not in h:  # 127.1, 010.0.0.1, 0x7f.0.0.1: getaddrinfo would dial another address
            raise ValueError(f"{host!r} ends in a number: only an IPv4 address, four decimal parts")
    h = h.lower()
    if _ASCII_NAME.fullmatch(h):
        return h
    if h.isascii():
        labels = h.split(".")
    else:
        try:
            labels = h.encode("idna").decode("ascii").split(".")
        except UnicodeError as e:
            raise ValueError(f"not a valid host name: {host!r}") from e
    for label in labels:
        if not label or len(label) > 63:
            raise ValueError(f"not a valid host name: {host!r}")
        if not all(c.isalnum() or c in "-_" for c in label) or label[0] == "-":
            raise ValueError(f"not a valid host name: {host!r}")
    return ".".join(labels)


def is_ip(host: str) -> bool:
    return bool(_MAYBE_IP.match(host.strip("[]"))) and canonical_ip(host) is not None


def split_hostport(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 literal."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unbalanced bracket in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {text!r}")
        return host, _port(rest[1:], text)
    if text.count(":") > 1:  # bare IPv6 literal
        head, _, tail = text.rpartition(":")
        if tail.isdigit() and is_ip(head) and ":" in head:
            raise ValueError(
                f"ambiguous {text!r}: write [{head}]:{tail} for an address and port,"
                f" or [{text}] for the address alone"
            )
        return text, None
    if ":" in text:
        host, _, port = text.rpartition(":")
        return host, _port(port, text)
    return text, None


def _port(s: str, text: str) -> int:
    if not s.isdigit() or not 0 < int(s) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return int(s)


def _url_as_host(raw: str) -> str:
    """The error for a URL written where a host belongs, naming the key to write instead."""
    from urllib.parse import urlsplit

    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    try:
        host = parts.hostname or ""
        hint = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        hint = ""
    instead = f" ({hint!r})" if hint else ""
    return (
        f"bad host pattern {raw!r}: write the bare host name{instead}, not a URL; "
        "paths are limited with deny: on the rule"
    )


def _loose_network(text: str) -> str | None:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1 << 18)
def parse_pattern(text: str) -> HostPattern:
    """Parse a rule key from `egress.hosts`. Raises ValueError with a user-facing message.

    Cached (patterns are immutable): schema validation, the duplicate check and the policy
    compiler each parse every key, and with 200,000 rules that was most of a config load."""
    raw = text.strip()
    wildcard = raw.startswith("*.")
    shape = _KEY_SHAPE.fullmatch(raw, 2 if wildcard else 0)
    if shape is not None and not ends_in_number(shape[1]):
        # Exactly the keys whose name normalise_host returns unchanged: the general path below
        # gives the same pattern (tests/test_hosts.py compares them) in a fraction of the time.
        host, port_text = shape.groups()
        if port_text is None:
            kind = PatternKind.WILDCARD if wildcard else PatternKind.HOST
            return HostPattern(kind, raw, host=host)
        if not wildcard:
            return HostPattern(PatternKind.HOSTPORT, raw, host=host, port=_port(port_text, raw))
    elif _IPV4_SHAPE.fullmatch(raw):
        try:
            addr = ipaddress.IPv4Address(raw)
        except ValueError:
            pass  # the general path names the problem
        else:
            net = ipaddress.IPv4Network(int(addr))  # a /32: from an int, 3x faster
            return HostPattern(PatternKind.NETWORK, raw, host=str(addr), network=net)
    return _parse_pattern(raw)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _as_dialled(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped address is read, and dialled, as its IPv4 address (`canonical_ip`): a
    rule on part of the mapped range (`::ffff:10.0.0.0/104`) is that IPv4 network, or it
    would never match. (A wider IPv6 rule, `::/0`, stays IPv6: IPv4 rules decide IPv4.)"""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _parse_pattern(raw: str) -> HostPattern:
    if not raw:
        raise ValueError("empty host pattern")
    if "://" in raw or ("/" in raw and not is_ip(raw.split("/", 1)[0].strip("[]"))):
        raise ValueError(_url_as_host(raw))
    if "/" in raw:
        try:
            net = ipaddress.ip_network(raw, strict=True)
        except ValueError as e:
            loose = _loose_network(raw)
            if loose is not None:
                raise ValueError(f"{raw!r} has host bits set: write {loose}") from None
            raise ValueError(f"bad network {raw!r}: {e}") from e
        return HostPattern(PatternKind.NETWORK, raw, network=_as_dialled(net))
    if any(c in raw for c in " ?#@"):
        raise ValueError(f"bad host pattern {raw!r}: give a host, host:port, *.suffix or CIDR")
    host, port = split_hostport(raw)
    if host.startswith("*."):
        if port is not None:
            raise ValueError(f"bad host pattern {raw!r}: wildcards take no port")
        suffix = normalise_host(host[2:])
        if "*" in suffix or is_ip(suffix):
            raise ValueError(f"bad host pattern {raw!r}: only a leading '*.' label is allowed")
        return HostPattern(PatternKind.WILDCARD, raw, host=suffix)
    if "*" in host:
        raise ValueError(f"bad host pattern {raw!r}: only a leading '*.' label is allowed")
    h = normalise_host(host)
    if is_ip(h) and port is None:
        net = ipaddress.ip_network(h)
        return HostPattern(PatternKind.NETWORK, raw, host=h, network=net)
    if port is not None:
        return HostPattern(PatternKind.HOSTPORT, raw, host=h, port=port)
    return HostPattern(PatternKind.HOST, raw, host=h)


class HostMatcher(Generic[T]):
    """Maps a (host, port) to the most specific rule value, or None."""

    __slots__ = ("_count", "_host", "_hostport", "_net_lengths", "_nets", "_suffix")

    def __init__(self, rules: list[tuple[HostPattern, T]] | None = None) -> None:
        self._hostport: dict[tuple[str, int], tuple[HostPattern, T]] = {}
        self._host: dict[str, tuple[HostPattern, T]] = {}
        self._suffix: dict[str, tuple[HostPattern, T]] = {}
        self._nets: dict[tuple[int, int], dict[int, tuple[HostPattern, T]]] = {}
        self._net_lengths: dict[int, list[int]] = {4: [], 6: []}
        self._count = 0
        for pattern, value in rules or []:
            self.add(pattern, value)

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: HostPattern, value: T) -> None:
        entry = (pattern, value)
        if pattern.kind is PatternKind.HOSTPORT:
            assert pattern.port is not None
            self._hostport[(pattern.host, pattern.port)] = entry
        elif pattern.kind is PatternKind.HOST:
            self._host[pattern.host] = entry
        elif pattern.kind is PatternKind.WILDCARD:
            self._suffix[pattern.host] = entry
        else:
            net = pattern.network
            assert net is not None
            key = (net.version, net.prefixlen)
            if key not in self._nets:
                self._nets[key] = {}
                lengths = self._net_lengths[net.version]
                lengths.append(net.prefixlen)
                lengths.sort(reverse=True)
            self._nets[key][int(net.network_address)] = entry
        self._count += 1

    def match(self, host: str, port: int, addr: str | None = None) -> tuple[HostPattern, T] | None:
        """`host` must already be normalised; `addr` is the resolved IP, if known.

        Name rules are consulted for names; network rules for IP literals and, failing every
        name rule, for the resolved address.
        """
        hit = self._hostport.get((host, port)) or self._host.get(host)
        if hit is not None:
            return hit
        if self._suffix and not (":" in host or (host[-1].isdigit() and is_ip(host))):
            dot = host.find(".")
            while dot >= 0:
                hit = self._suffix.get(host[dot + 1 :])
                if hit is not None:
                    return hit
                dot = host.find(".", dot + 1)
        if self._nets:
            for candidate in (host, addr):
                if candidate is None:
                    continue
                ip = parse_ip(candidate, unmap=True)
                if ip is None:
                    continue
                hit = self._match_ip(ip)
                if hit is not None:
                    return hit
        return None

    def match_address(
        self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> tuple[HostPattern, T] | None:
        """The most specific IP/CIDR rule containing `ip`, whatever name led there."""
        return self._match_ip(ip) if self._nets else None

    def _match_ip(
        self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> tuple[HostPattern, T] | None:
        bits = 32 if ip.version == 4 else 128
        value = int(ip)
        for plen in self._net_lengths[ip.version]:
            masked = value & (((1 << plen) - 1) << (bits - plen)) if plen else 0
            hit = self._nets[(ip.version, plen)].get(masked)
            if hit is not None:
                return hit
        return None
