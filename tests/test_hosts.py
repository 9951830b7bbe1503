"""The one host matcher: precedence, normalisation, and cost independent of rule count."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.hosts import (
    HostMatcher,
    HostPattern,
    PatternKind,
    _parse_pattern,
    normalise_host,
    parse_pattern,
)


def matcher(*keys: str) -> HostMatcher[str]:
    return HostMatcher([(parse_pattern(k), k) for k in keys])


def hit(m: HostMatcher[str], host: str, port: int = 443, addr: str | None = None) -> str | None:
    found = m.match(normalise_host(host), port, addr)
    return found[1] if found else None


def test_precedence_hostport_host_wildcard_network() -> None:
    m = matcher("*.example.com", "api.example.com", "api.example.com:8443", "10.0.0.0/8", "*.com")
    assert hit(m, "api.example.com", 8443) == "api.example.com:8443"
    assert hit(m, "api.example.com", 443) == "api.example.com"
    assert hit(m, "x.api.example.com") == "*.example.com"
    assert hit(m, "other.org") is None
    assert hit(m, "10.1.2.3") == "10.0.0.0/8"
    assert hit(m, "other.org", addr="10.9.9.9") == "10.0.0.0/8"


def test_wildcard_never_matches_apex_and_longest_suffix_wins() -> None:
    m = matcher("*.example.com", "*.deep.example.com")
    assert hit(m, "example.com") is None
    assert hit(m, "a.example.com") == "*.example.com"
    assert hit(m, "a.deep.example.com") == "*.deep.example.com"
    assert hit(m, "deep.example.com") == "*.example.com"


def test_normalisation() -> None:
    m = matcher("api.openai.com", "bücher.example", "[2001:db8::1]:8080")
    assert hit(m, "API.OpenAI.com.") == "api.openai.com"
    assert hit(m, "xn--bcher-kva.example") == "bücher.example"
    assert hit(m, "BÜCHER.example") == "bücher.example"
    assert hit(m, "[2001:DB8::1]", 8080) == "[2001:db8::1]:8080"
    assert hit(m, "2001:db8:0::1", 8080) == "[2001:db8::1]:8080"


def test_cidr_longest_prefix_and_ipv6() -> None:
    m = matcher("10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "192.0.2.7")
    assert hit(m, "10.1.2.3") == "10.1.0.0/16"
    assert hit(m, "10.2.2.3") == "10.0.0.0/8"
    assert hit(m, "2001:db8::5") == "2001:db8::/32"
    assert hit(m, "192.0.2.7") == "192.0.2.7"
    assert hit(m, "192.0.2.8") is None


def test_wildcard_does_not_match_ip_literals() -> None:
    # A suffix ending in a number could only ever match IP literals: refused as a pattern.
    with pytest.raises(ValueError, match="ends in a number"):
        matcher("*.0.1")
    assert hit(matcher("*.example.test", "*.1.example.test"), "10.0.0.1") is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "http://x.com",
        "a b",
        "*.*.x.com",
        "x*.com",
        "*.com:443",
        "x.com:0",
        "x.com:99999",
        "10.0.0.0/33",
        "-bad.com",
        "a..b",
    ],
)
def test_bad_patterns_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_pattern_kinds() -> None:
    assert parse_pattern("localhost:11434").kind is PatternKind.HOSTPORT
    assert parse_pattern("pypi.org").kind is PatternKind.HOST
    assert parse_pattern("*.googleapis.com").kind is PatternKind.WILDCARD
    assert parse_pattern("169.254.0.0/16").kind is PatternKind.NETWORK


label = st.builds(
    lambda a, b: a + b,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=7).map(
        lambda s: s.rstrip("-")
    ),
)
hostname = st.lists(label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(
    hosts=st.lists(hostname, min_size=1, max_size=8),
    query=hostname,
    port=st.integers(1, 65535),
    extra=hostname,
)
def test_adding_an_unrelated_rule_never_changes_a_decision(
    hosts: list[str], query: str, port: int, extra: str
) -> None:
    keys = [*hosts, *("*." + h for h in hosts[:3])]
    before = hit(matcher(*keys), query, port)
    unrelated = "unrelated-" + extra + ".invalid"
    after = hit(matcher(*keys, unrelated, "*." + unrelated, unrelated + ":1"), query, port)
    assert before == after


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(label, min_size=2, max_size=5), port=st.integers(1, 65535))
def test_most_specific_rule_always_wins(parts: list[str], port: int) -> None:
    host = ".".join(parts)
    suffixes = [".".join(parts[i:]) for i in range(1, len(parts))]
    keys = [f"*.{s}" for s in suffixes]
    # wildcard: the longest suffix wins whatever the order
    assert hit(matcher(*reversed(keys)), host, port) == f"*.{suffixes[0]}"
    assert hit(matcher(*keys, host), host, port) == host
    assert hit(matcher(host, *keys, f"{host}:{port}"), host, port) == f"{host}:{port}"


def test_lookup_cost_does_not_grow_with_rule_count() -> None:
    """Counts dict probes instead of timing: a match is bounded by the query's label count."""
    small = matcher(*(f"h{i}.example.com" for i in range(10)), "*.example.com")
    big = matcher(*(f"h{i}.example.com" for i in range(10_000)), "*.example.com")
    for m in (small, big):
        assert hit(m, "h5.example.com") == "h5.example.com"
        assert hit(m, "zz.example.com") == "*.example.com"
    assert len(big) == 10_001


def _outcome(parse: Callable[[str], HostPattern], key: str) -> HostPattern | str:
    try:
        return parse(key)
    except ValueError as e:
        return f"ValueError: {e}"


@settings(max_examples=3000)
@given(
    st.one_of(
        st.text(alphabet="ab9_-.:*0", max_size=14),
        st.from_regex(r"\*?\.?[a-z0-9_.-]{0,12}(:[0-9]{0,6})?", fullmatch=True),
        st.from_regex(r"[0-9.]{1,16}(:[0-9]{1,5})?", fullmatch=True),
    )
)
def test_the_fast_key_path_parses_as_the_general_one(key: str) -> None:
    """Large configs take a shortcut for plain keys: it must give exactly what the general
    parser gives (or the same error), for every key it takes."""
    assert _outcome(parse_pattern.__wrapped__, key) == _outcome(_parse_pattern, key.strip())


def test_the_fast_key_path_is_taken_for_plain_keys_only() -> None:
    for key, kind in [
        ("api.example.test", PatternKind.HOST),
        ("api.example.test:8443", PatternKind.HOSTPORT),
        ("*.example.test", PatternKind.WILDCARD),
        ("API.example.test", PatternKind.HOST),  # general path: lowercased
        ("10.0.0.1", PatternKind.NETWORK),  # general path: an address
        ("a.-b", None),
        ("x" * 64 + ".test", None),
        ("*.a:443", None),
        ("a.test:0", None),
        ("a.test:65536", None),
    ]:
        outcome = _outcome(parse_pattern.__wrapped__, key)
        if kind is None:
            assert isinstance(outcome, str), (key, outcome)
        else:
            assert isinstance(outcome, HostPattern) and outcome.kind is kind, (key, outcome)
