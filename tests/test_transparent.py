"""The one transparent verifier: a transparent connection dialled only an IP, so the name it
claims (SNI, else Host) is believed only if keyward itself maps that name to that address."""

from __future__ import annotations

from gateway.planes.transparent import make_verifier
from gateway.upstream.routes import Routes

IP = "127.0.0.1"
PORT = 8443
ROUTES = Routes(overrides={("plain.example.test", PORT): (IP, PORT)})
ANSWERS = {IP: {"dns.example.test"}}
verify = make_verifier(lambda ip: ANSWERS.get(ip, set()), ROUTES.target)


def test_a_name_is_believed_only_for_an_address_keyward_gave_it() -> None:
    assert verify(IP, PORT, None, f"plain.example.test:{PORT}") == "plain.example.test"  # resolve
    assert verify(IP, PORT, None, "dns.example.test") == "dns.example.test"  # a DNS answer
    assert verify(IP, PORT, None, "DNS.Example.Test.") == "dns.example.test"  # normalised
    assert verify(IP, PORT, None, "evil.example.test") is None  # not this address
    assert verify("10.9.9.9", PORT, None, "dns.example.test") is None  # another address
    assert verify(IP, 9, None, "plain.example.test") is None  # upstream.resolve is per port


def test_sni_is_the_claim_when_there_is_one() -> None:
    assert verify(IP, PORT, "dns.example.test", "evil.example.test") == "dns.example.test"
    assert verify(IP, PORT, "evil.example.test", "dns.example.test") is None


def test_an_ip_literal_names_only_its_own_address() -> None:
    assert verify(IP, PORT, None, IP) == IP
    assert verify(IP, PORT, None, "10.9.9.9") is None
    # One reading of an address on both sides: the mapped form is the IPv4 address it reaches.
    assert verify(IP, PORT, None, "[::ffff:127.0.0.1]") == IP
    assert verify("::ffff:127.0.0.1", PORT, None, IP) == IP
    assert verify(IP, PORT, None, "0177.0.0.1") is None  # octal: another address to getaddrinfo


def test_no_claim_or_a_malformed_one_names_nothing() -> None:
    assert verify(IP, PORT, None, None) is None
    assert verify(IP, PORT, None, "") is None
    assert verify(IP, PORT, None, "bad host:x") is None
