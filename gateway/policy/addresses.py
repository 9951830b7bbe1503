"""Which IP addresses an allowed *name* may not reach by accident (DESIGN §7.7).

Sans-IO: an address in, the class that makes it special out (None = an ordinary address). The
policy core decides whether a rule lets a name reach a special address anyway; the data planes
ask at dial time, on the address they are about to connect to.

Refused by default, and why:
- loopback, unspecified (0.0.0.0/8 and :: reach the host itself on Linux), RFC 1918 private,
  link-local (169.254.0.0/16 holds the cloud metadata service; fe80::/10), CGNAT 100.64.0.0/10,
  unique-local fc00::/7 (fd00:ec2::254 is the metadata service over IPv6), site-local fec0::/10;
- multicast, broadcast, 240.0.0.0/4 and the other reserved blocks (192.0.0.0/24 protocol
  assignments, 198.18.0.0/15 benchmarking, which some networks use internally; 100::/64
  discard-only): nothing an agent needs lives there;
- IPv6 forms that carry an IPv4 address (mapped ::ffff:0:0/96, translated ::ffff:0:0:0/96,
  compatible ::/96, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo): classed by
  the IPv4 address inside, so ::ffff:127.0.0.1 is loopback. A compatible address with a public
  IPv4 inside is refused too (deprecated, never a real destination). The local-use NAT64 block
  64:ff9b:1::/48 is refused whole: where the IPv4 address sits in it depends on the network.
Left ordinary: the documentation ranges 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and
2001:db8::/32. They are never routed on a real network, so refusing them protects nothing, and
test set-ups (ours included) use them as stand-ins for public hosts inside their own namespaces.
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), cls)
    for net, cls in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), cls)
    for net, cls in (
        ("::1/128", "loopback"),
        ("::/128", "unspecified"),
        ("100::/64", "reserved"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        # Local-use NAT64 (RFC 8215): its prefix may be /48 to /96, so where the IPv4 address
        # sits cannot be known from outside; refused whole.
        ("64:ff9b:1::/48", "local-nat64"),
        ("ff00::/8", "multicast"),
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def canonical_ip(
    text: str, *, brackets: bool = True, zone: bool = True, unmap: bool = False
) -> IPAddress | None:
    """The one reading of an IP literal, or None if `text` is not one. Every job asks here:
    the address guard and the matcher (`parse_ip`), the policy's host key
    (`hosts.normalise_host`) and the DNS listener's answer log (`ip_key`).

    - One pair of brackets is allowed (`[::1]`; `brackets=False`: the caller took them off);
      nothing else around the address.
    - IPv4 only as four decimal parts without leading zeros. Python refuses `010.0.0.1`,
      `0x7f.0.0.1`, `127.1` and `2130706433`, which getaddrinfo reads as other addresses
      (8.0.0.1, 127.0.0.1): see `ends_in_number` for refusing them as names too.
    - A zone index (`fe80::1%eth0`) is dropped where the address is classified or matched
      (`zone=True`: the zone picks an interface, not another address), or makes the text not
      an address (`zone=False`: a host key never carries one).
    - `unmap`: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) as the IPv4 address it
      reaches, so rules about 10.0.0.1 apply to it.
    """
    if brackets and text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "%" in text and not zone:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(int(ip))
        if unmap and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str, unmap: bool = False) -> IPAddress | None:
    """An address to classify, match or dial (brackets and a zone index allowed), or None.
    Cached: the guard asks about the same few addresses on every new connection."""
    return canonical_ip(text, unmap=unmap)


def ip_key(text: str) -> str | None:
    """The text one address is known by wherever addresses are compared as strings (the DNS
    listener's answer log): zone dropped, IPv4-mapped as IPv4; None if not an address."""
    ip = parse_ip(text, unmap=True)
    return None if ip is None else str(ip)


_HEX = frozenset("0123456789abcdefABCDEF")


def ends_in_number(host: str) -> bool:
    """Whether a URL parser (WHATWG "ends in a number") or getaddrinfo reads `host` as an
    IPv4 address: its last label is decimal or `0x` hex (`127.1`, `0x7f.0.0.1`, `010.0.0.1`,
    `2130706433`). Such a host is an address or nothing: never a name to match rules on."""
    last = host[host.rfind(".") + 1 :]
    if last[:2] in ("0x", "0X"):
        return all(c in _HEX for c in last[2:])
    return last.isascii() and last.isdigit()


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, translated, compatible, NAT64,
    6to4, Teredo server and client)."""
    out: list[ipaddress.IPv4Address] = []
    value = int(ip)
    low32 = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip in _MAPPED or ip in _TRANSLATED or ip in _COMPATIBLE or ip in _NAT64:
        out.append(low32)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    return out


@functools.lru_cache(maxsize=4096)
def address_class(text: str) -> str | None:
    """The special class of an address (loopback, private, ...), or None for an ordinary one.

    Text that is not an address is classed "invalid": nothing may be dialled on its strength.
    Cached: the data planes ask once per new connection, mostly about the same few addresses.
    """
    ip = parse_ip(text)
    if ip is None:
        return "invalid"
    return classify(ip)


def classify(ip: IPAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv4Address):
        for net, cls in _V4:
            if ip in net:
                return cls
        return None
    if ip in _COMPATIBLE and ip not in _V6[0][0] and ip not in _V6[1][0]:
        inner = classify(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return f"ipv4-compatible {inner}" if inner else "ipv4-compatible"
    for net6, cls in _V6:
        if ip in net6:
            return cls
    for inner_ip in embedded_ipv4(ip):
        inner = classify(inner_ip)
        if inner is not None:
            return f"embedded {inner}"
    return None
