"""The address classifier and the policy's private-address decision (sans-IO)."""

from __future__ import annotations

import pytest

from gateway.config.compile import build_policy
from gateway.config.loader import parse_config_text
from gateway.policy.addresses import address_class

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("10.1.2.3", "private"),
    ("172.31.255.255", "private"),
    ("192.168.0.1", "private"),
    ("100.64.0.1", "cgnat"),
    ("169.254.169.254", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fd00:ec2::254", "unique-local"),
    ("fc00::1", "unique-local"),
    ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("::ffff:127.0.0.1", "embedded loopback"),
    ("::ffff:169.254.169.254", "embedded link-local"),
    ("::ffff:0:10.0.0.1", "embedded private"),
    ("::127.0.0.1", "ipv4-compatible loopback"),
    ("::8.8.8.8", "ipv4-compatible"),
    ("64:ff9b::10.0.0.1", "embedded private"),
    ("64:ff9b::169.254.169.254", "embedded link-local"),
    ("64:ff9b:1::1", "local-nat64"),
    ("2002:7f00:1::", "embedded loopback"),
    ("2002:a9fe:a9fe::1", "embedded link-local"),
    ("not-an-address", "invalid"),
]
ORDINARY = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",
    # documentation ranges: never routed, used by test set-ups as public stand-ins
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.5",
    "2001:db8::1",
]


@pytest.mark.parametrize(("addr", "category"), REFUSED)
def test_special_addresses_are_classed(addr: str, category: str) -> None:
    assert address_class(addr) == category


@pytest.mark.parametrize("addr", ORDINARY)
def test_ordinary_addresses(addr: str) -> None:
    assert address_class(addr) is None


CONFIG = """version: 1
egress:
  default: allow
  hosts:
    "*.allowed.test": {}
    "localhost:11434": {}
    "127.0.0.1:8080": {}
    "10.0.0.0/8": {}
    "10.9.0.0/16": { allow: false }
    internal.corp.test: { private_addresses: allow }
    "svc.corp.test:8443": { private_addresses: allow }
upstream:
  resolve: { "api.example.test:443": "127.0.0.1:9443" }
"""


@pytest.mark.parametrize(
    ("host", "port", "addr", "refusal"),
    [
        ("internal.allowed.test", 80, "127.0.0.1", "loopback"),  # wildcard: refused
        ("internal.allowed.test", 80, "::ffff:127.0.0.1", "embedded loopback"),
        ("x.allowed.test", 443, "169.254.169.254", "link-local"),
        ("x.allowed.test", 443, "203.0.113.9", None),  # ordinary address: fine
        ("unlisted.test", 80, "192.168.1.1", "private"),  # default allow is no allowance
        ("127.0.0.1", 80, "127.0.0.1", "loopback"),  # an IP literal no rule names
        ("localhost", 11434, "127.0.0.1", None),  # the local model server rule
        ("localhost", 11434, "::1", None),
        ("localhost", 11434, "10.0.0.1", None),  # ... via the CIDR rule
        ("localhost", 11434, "192.168.0.1", "private"),  # localhost names loopback only
        ("localhost", 9999, "127.0.0.1", "loopback"),  # another port: no rule
        ("127.0.0.1", 8080, "127.0.0.1", None),  # IP literal host:port rule
        ("127.0.0.1", 8080, "::ffff:127.0.0.1", None),
        ("10.1.2.3", 8080, "10.1.2.3", None),  # CIDR rule
        ("x.allowed.test", 80, "10.1.2.3", None),  # the CIDR rule names the address
        ("x.allowed.test", 80, "10.9.1.1", "private"),  # ... unless the closer one denies
        ("internal.corp.test", 80, "192.168.1.1", None),  # private_addresses: allow
        ("svc.corp.test", 8443, "127.0.0.1", None),
        ("svc.corp.test", 9999, "127.0.0.1", "loopback"),
        ("api.example.test", 443, "127.0.0.1", None),  # an upstream.resolve target
        ("api.example.test", 80, "127.0.0.1", "loopback"),  # ... for that port only
        # the DNS listener asks for any port (0)
        ("svc.corp.test", 0, "127.0.0.1", None),
        ("api.example.test", 0, "127.0.0.1", None),
        ("internal.allowed.test", 0, "10.9.1.1", "private"),
        ("localhost", 0, "127.0.0.1", None),
    ],
)
def test_address_refusal(host: str, port: int, addr: str, refusal: str | None) -> None:
    policy = build_policy(parse_config_text(CONFIG, "keyward.yaml").config)
    assert policy.address_refusal(host, port, addr) == refusal
