"""The address classifier and the policy's private-address decision (sans-IO)."""

from __future__ import annotations

import pytest

from gateway.config.compile import build_policy
from gateway.config.loader import parse_config_text
from gateway.errors import ConfigError
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


# One reading of IP literals for every job: the address guard (`parse_ip`), the policy's host
# key (`normalise_host`) and the DNS listener's answer log (`ip_key`). (text, parse_ip, host
# key, answer-log key); None = not an address there (the host key: refused, ValueError).
IP_FORMS = [
    ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.1"),
    ("[2001:DB8::1]", "2001:db8::1", "2001:db8::1", "2001:db8::1"),
    ("[10.0.0.1]", "10.0.0.1", "10.0.0.1", "10.0.0.1"),
    # IPv4-mapped: the address guard classes it by the IPv4 inside (see REFUSED); the host key
    # and the answer log are the IPv4 address it reaches, so rules about 10.0.0.1 apply.
    ("::ffff:10.0.0.1", "::ffff:a00:1", "10.0.0.1", "10.0.0.1"),
    ("[::ffff:a00:1]", "::ffff:a00:1", "10.0.0.1", "10.0.0.1"),
    # A zone picks an interface: dropped where an address is classed or compared; a host
    # naming one is refused (an agent has no business choosing the gateway's interface).
    ("fe80::1%eth0", "fe80::1", None, "fe80::1"),
    ("[fe80::1%25eth0]", "fe80::1", None, "fe80::1"),
    # What getaddrinfo reads as another address (010 is octal 8) is no address anywhere, and
    # no host name either.
    ("010.0.0.1", None, None, None),
    ("0177.0.0.1", None, None, None),
    ("0x7f.0.0.1", None, None, None),
    ("127.1", None, None, None),
    ("2130706433", None, None, None),
    ("1.2.3.4.5", None, None, None),
    ("256.0.0.1", None, None, None),
    # Unbalanced or doubled brackets are not an address.
    ("[10.0.0.1", None, None, None),
    ("[[::1]]", None, None, None),
]


@pytest.mark.parametrize(("text", "address", "host", "key"), IP_FORMS)
def test_one_ip_reading_for_every_job(
    text: str, address: str | None, host: str | None, key: str | None
) -> None:
    from gateway.policy.addresses import ip_key, parse_ip
    from gateway.policy.hosts import normalise_host

    parsed = parse_ip(text)
    assert (str(parsed) if parsed is not None else None) == address
    assert ip_key(text) == key
    if host is None:
        with pytest.raises(ValueError):
            normalise_host(text)
    else:
        assert normalise_host(text) == host
    if address is None:
        assert address_class(text) == "invalid"  # never dialled on its strength


@pytest.mark.parametrize("name", ["0x7f.1", "010.0.0.1", "1.2.3", "a.b.0x1", "host.123"])
def test_a_host_ending_in_a_number_is_an_address_or_refused(name: str) -> None:
    from gateway.policy.core import Plane, Policy, RequestFacts, Verdict
    from gateway.policy.hosts import normalise_host

    with pytest.raises(ValueError, match="ends in a number"):
        normalise_host(name)
    policy = Policy([], default=Verdict.ALLOW)
    decision = policy.decide(RequestFacts(Plane.MITM, "GET", "https", name, 443))
    assert (decision.verdict, decision.reason) == (Verdict.DENY, "bad-host")
    assert not policy.connection(name, 443).allowed
    assert not policy.decide_name(name).allowed
    assert normalise_host("0x7f.example.test") == "0x7f.example.test"  # a name label is fine


def test_rules_about_an_ipv4_address_apply_to_its_mapped_form() -> None:
    """A deny rule on 203.0.113.5 under `default: allow` holds for [::ffff:203.0.113.5] (a
    dual-stack dial of it reaches 203.0.113.5), whether the agent names it or it is the
    connection's original destination."""
    config = """version: 1
egress:
  default: allow
  hosts:
    "203.0.113.5": { allow: false }
    "198.51.100.0/24": { allow: false }
"""
    from gateway.policy.core import Plane, RequestFacts, Verdict

    policy = build_policy(parse_config_text(config, "keyward.yaml").config)
    for host in ("[::ffff:203.0.113.5]", "::ffff:cb00:7105", "[::ffff:198.51.100.7]"):
        decision = policy.decide(RequestFacts(Plane.MITM, "GET", "https", host, 443))
        assert (decision.verdict, decision.reason) == (Verdict.DENY, "host-denied"), host
        assert not policy.connection(host, 443).allowed
    named = policy.connection("up.example.test", 443, addr="::ffff:198.51.100.7")
    assert not named.allowed and named.rule == "198.51.100.0/24"


def test_the_answer_log_knows_an_address_by_one_key() -> None:
    from gateway.dns.server import AnswerLog

    log = AnswerLog()
    log.record("a.example.test", ["::ffff:10.0.0.1", "fe80::1%eth0", "010.0.0.1"])
    assert log.names_for("10.0.0.1") == {"a.example.test"}
    assert log.names_for("[::ffff:10.0.0.1]") == {"a.example.test"}
    assert log.names_for("fe80::1") == {"a.example.test"}
    assert log.names_for("8.0.0.1") == set()
    assert log.addresses_for("a.example.test") == {"10.0.0.1", "fe80::1"}


def test_a_rule_on_part_of_the_mapped_range_is_that_ipv4_network() -> None:
    """`::ffff:198.51.100.0/120` names the IPv4 addresses 198.51.100.0/24 in mapped form; mapped
    addresses are read as IPv4, so the rule is compiled as that IPv4 network and holds for
    both spellings (compiled as IPv6 it would never match again)."""
    from gateway.policy.core import Plane, RequestFacts, Verdict

    config = """version: 1
egress:
  default: allow
  hosts:
    "::ffff:198.51.100.0/120": { allow: false }
    "::ffff:0:0/96": { allow: false }
"""
    twice = config.replace('"::ffff:198.51.100.0/120"', '"0.0.0.0/0"')
    with pytest.raises(ConfigError, match="same rule"):  # ::ffff:0:0/96 is 0.0.0.0/0
        parse_config_text(twice, "k.yaml")
    policy = build_policy(
        parse_config_text(
            config.replace('    "::ffff:0:0/96": { allow: false }\n', ""), "k.yaml"
        ).config
    )
    for host in ("198.51.100.7", "[::ffff:198.51.100.7]", "[::ffff:c633:6407]"):
        decision = policy.decide(RequestFacts(Plane.MITM, "GET", "https", host, 443))
        assert (decision.verdict, decision.reason) == (Verdict.DENY, "host-denied"), host
    assert policy.decide(RequestFacts(Plane.MITM, "GET", "https", "198.51.101.7", 443)).allowed
    everything = build_policy(parse_config_text(config, "k.yaml").config)
    for host in ("192.0.2.1", "[::ffff:192.0.2.1]"):
        assert not everything.decide(RequestFacts(Plane.MITM, "GET", "https", host, 443)).allowed
