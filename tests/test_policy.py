"""The policy core: decisions, precedence, integrity checks, and plans applied only when allowed."""

from __future__ import annotations

import base64

import pytest

from gateway.config.compile import build_policy
from gateway.config.loader import parse_config_text
from gateway.errors import NotAllowedError
from gateway.policy import (
    HostRule,
    Placeholder,
    Plane,
    Policy,
    RequestFacts,
    Verdict,
    apply_plan,
    parse_pattern,
    swap_placeholders,
)
from gateway.policy.apply import swap_in_target

CONFIG = """
version: 1
secrets:
  openai: { env: OPENAI_API_KEY }
  github: { env: GITHUB_TOKEN }
  local: { env: LOCAL_KEY }
egress:
  default: DEFAULT
  hosts:
    api.openai.com:
      headers: { Authorization: "Bearer {openai}", X-Literal: "{{braces}}" }
    api.github.com:
      headers: { Authorization: "Bearer {github}" }
      deny: ["DELETE /repos/**", "PUT /repos/*/*/collaborators/**"]
    github.com:
      basic: { username: x-access-token, password: "{github}" }
    "localhost:11434":
      headers: { X-Key: "{local}" }
      plain_http: true
    localhost: { allow: false }
    pypi.org: {}
    "169.254.0.0/16": { allow: false }
"""

OPENAI_FAKE = "sk-fakefakefakefakefakefake0001"


def policy(default: str = "deny") -> Policy:
    loaded = parse_config_text(CONFIG.replace("DEFAULT", default), "t.yaml")
    return build_policy(loaded.config, [Placeholder("OPENAI_API_KEY", "openai", OPENAI_FAKE)])


def facts(
    url_host: str, path: str = "/", method: str = "GET", port: int = 443, **kw: object
) -> RequestFacts:
    scheme = str(kw.pop("scheme", "https"))
    return RequestFacts(Plane.MITM, method, scheme, url_host, port, path, **kw)  # type: ignore[arg-type]


class CountingResolver:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str) -> str:
        self.calls.append(name)
        return {"openai": "REAL-openai-value", "github": "REAL-gh", "local": "REAL-local"}[name]


def test_allow_injects_and_replaces_agent_headers() -> None:
    d = policy().decide(facts("api.openai.com", "/v1/chat"))
    assert d.verdict is Verdict.ALLOW and d.rule == "api.openai.com"
    assert [i.as_dict() for i in d.injections] == [
        {"secret": "openai", "location": "header:Authorization"}
    ]
    r = CountingResolver()
    out = apply_plan(
        d, [("authorization", "Bearer agent"), ("AUTHORIZATION", "dup"), ("Accept", "*/*")], r
    )
    assert out == [
        ("Accept", "*/*"),
        ("Authorization", "Bearer REAL-openai-value"),
        ("X-Literal", "{braces}"),
    ]


def test_basic_auth_encoding() -> None:
    d = policy().decide(facts("github.com", "/o/r.git/info/refs"))
    out = dict(apply_plan(d, [], CountingResolver()))
    assert out["Authorization"] == "Basic " + base64.b64encode(b"x-access-token:REAL-gh").decode()


@pytest.mark.parametrize(
    ("host", "port", "verdict", "rule"),
    [
        ("localhost", 11434, Verdict.ALLOW, "localhost:11434"),
        ("localhost", 8080, Verdict.DENY, "localhost"),
        ("169.254.169.254", 80, Verdict.DENY, "169.254.0.0/16"),
        ("evil.example", 443, Verdict.DENY, None),
    ],
)
def test_precedence(host: str, port: int, verdict: Verdict, rule: str | None) -> None:
    d = policy().decide(facts(host, port=port, scheme="http"))
    assert (d.verdict, d.rule) == (verdict, rule)


@pytest.mark.parametrize(
    "path", ["/repos/o/r", "/repos/../repos/o/r", "//repos/o/r", "/%72epos/o/r"]
)
def test_method_path_deny_cannot_be_dodged(path: str) -> None:
    d = policy().decide(facts("api.github.com", path, method="delete"))
    assert d.verdict is Verdict.DENY and d.reason == "path-denied: DELETE /repos/**"
    assert policy().decide(facts("api.github.com", path, method="GET")).allowed


def test_default_modes() -> None:
    assert policy("allow").decide(facts("evil.example")).verdict is Verdict.ALLOW
    warn = policy("warn").decide(facts("evil.example"))
    assert (
        warn.verdict is Verdict.WARN
        and warn.reason == "would-deny: no-rule"
        and warn.injections == ()
    )
    # explicit denies stay denies in warn mode
    assert policy("warn").decide(facts("169.254.169.254", port=80)).verdict is Verdict.DENY


def test_host_header_and_sni_must_match_verified_destination() -> None:
    p = policy()
    spoof = p.decide(facts("attacker.example", host_header="api.openai.com"))
    assert spoof.verdict is Verdict.DENY and spoof.reason == "host-mismatch" and spoof.plan is None
    assert p.decide(facts("api.openai.com", host_header="API.openai.com.")).allowed
    assert p.decide(facts("api.openai.com", host_header="api.openai.com:443")).allowed
    assert (
        p.decide(facts("api.openai.com", host_header="api.openai.com:444")).reason
        == "host-mismatch"
    )
    assert p.decide(facts("api.openai.com", sni="evil.example")).reason == "sni-mismatch"


def test_plain_http_credentials_need_rule_opt_in() -> None:
    d = policy().decide(facts("api.openai.com", port=80, scheme="http"))
    assert d.verdict is Verdict.DENY and d.reason == "plain-http-credentials"
    assert policy().decide(facts("localhost", port=11434, scheme="http")).allowed


def test_placeholder_swap_only_on_hosts_using_the_secret() -> None:
    p = policy()
    ok = p.decide(facts("api.openai.com", headers=(("Authorization", f"Bearer {OPENAI_FAKE}"),)))
    assert ok.allowed and {i.location for i in ok.injections} >= {"placeholder:OPENAI_API_KEY"}
    swapped = swap_placeholders(ok, f"k={OPENAI_FAKE}", CountingResolver(), "header")
    assert swapped == "k=REAL-openai-value"
    for host in ("pypi.org", "api.github.com", "evil.example"):
        bad = p.decide(facts(host, f"/x?k={OPENAI_FAKE}"))
        assert bad.verdict is Verdict.DENY and bad.alert
        assert bad.reason == "placeholder-wrong-host: OPENAI_API_KEY"
    assert policy("allow").decide(facts("evil.example", headers=(("X", OPENAI_FAKE),))).alert


def swap_policy(swap_in: frozenset[str]) -> Policy:
    loaded = parse_config_text(CONFIG.replace("DEFAULT", "deny"), "t.yaml")
    ph = Placeholder("OPENAI_API_KEY", "openai", OPENAI_FAKE, swap_in)
    return build_policy(loaded.config, [ph])


def test_placeholder_swapped_only_where_swap_in_says() -> None:
    """Default [header, basic]: the query, the path, bodies and WebSocket messages keep the
    placeholder unchanged and the request is an alert; listed locations swap."""
    r = CountingResolver()
    blob = base64.b64encode(f"user:{OPENAI_FAKE}".encode()).decode()
    default = swap_policy(frozenset({"header", "basic"}))
    d = default.decide(facts("api.openai.com", headers=(("Authorization", f"Basic {blob}"),)))
    assert d.allowed and not d.alert
    out = dict(apply_plan(d, [("X-Other", f"Basic {blob}"), ("Authorization", f"Basic {blob}")], r))
    assert out["X-Other"] == f"Basic {blob}"  # only Authorization carries Basic credentials
    for location in ("query", "path"):
        path = f"/v1?k={OPENAI_FAKE}" if location == "query" else f"/v1/{OPENAI_FAKE}"
        d = default.decide(facts("api.openai.com", path))
        assert d.allowed and d.alert
        assert d.extra["placeholder-not-swapped"] == f"OPENAI_API_KEY in {location}"
        assert swap_in_target(d, path, r) == path
        assert d.plan is not None and d.plan.swappable("body") == ()
    query = swap_policy(frozenset({"query", "body", "websocket"}))
    d = query.decide(facts("api.openai.com", f"/v1/{OPENAI_FAKE}?k={OPENAI_FAKE}"))
    assert d.alert  # the path is never a swap location
    assert swap_in_target(d, f"/v1/{OPENAI_FAKE}?k={OPENAI_FAKE}", r) == (
        f"/v1/{OPENAI_FAKE}?k=REAL-openai-value"
    )
    d = query.decide(facts("api.openai.com", headers=(("Authorization", f"Bearer {OPENAI_FAKE}"),)))
    assert d.alert and d.extra["placeholder-not-swapped"] == "OPENAI_API_KEY in header"
    assert d.plan is not None and [p.env for p in d.plan.swappable("body")] == ["OPENAI_API_KEY"]
    assert query.decide(facts("pypi.org", f"/?k={OPENAI_FAKE}")).reason.startswith(
        "placeholder-wrong-host"
    )


def test_basic_blob_placeholder_is_swapped_inside_the_blob() -> None:
    r = CountingResolver()
    blob = base64.b64encode(f"x-access-token:{OPENAI_FAKE}".encode()).decode()
    d = policy().decide(facts("api.openai.com", headers=(("Authorization", f"Basic {blob}"),)))
    assert d.allowed and not d.alert
    headers = apply_plan(d, [("Authorization", f"Basic {blob}")], r)
    values = [v for k, v in headers if k == "Authorization"]
    assert values == ["Bearer REAL-openai-value"]  # the rule's own header replaces it
    header_only = swap_policy(frozenset({"header"}))
    d = header_only.decide(facts("api.openai.com", headers=(("Authorization", f"Basic {blob}"),)))
    assert d.alert and d.extra["placeholder-not-swapped"] == "OPENAI_API_KEY in basic"


def test_denied_request_never_touches_a_secret() -> None:
    r = CountingResolver()
    for d in (
        policy().decide(facts("evil.example")),
        policy().decide(facts("attacker.example", host_header="api.openai.com")),
        policy().decide(facts("api.github.com", "/repos/a/b", method="DELETE")),
    ):
        assert not d.allowed and d.plan is None
        with pytest.raises(NotAllowedError):
            apply_plan(d, [("A", "b")], r)
        with pytest.raises(NotAllowedError):
            swap_placeholders(d, "x", r, "header")
    assert r.calls == []


def test_allowed_request_with_nothing_to_inject_reads_nothing() -> None:
    r = CountingResolver()
    d = policy().decide(facts("pypi.org", "/simple/"))
    assert apply_plan(d, [("A", "b")], r) == [("A", "b")] and r.calls == []


def test_connection_decisions() -> None:
    p = policy()
    assert p.connection("api.openai.com", 443).intercept
    assert not p.connection("evil.example", 443).allowed
    assert p.connection("api.openai.com", 443, sni="evil.example").reason == "sni-mismatch"


def test_dns_names() -> None:
    p = policy()
    assert p.decide_name("api.openai.com").allowed
    assert not p.decide_name("localhost").allowed  # host rule says allow: false
    evil = p.decide_name("evil.example")
    assert (evil.allowed, evil.rule) == (False, None)
    assert not p.decide_name("api.openai.com", "TXT").allowed


def name_policy(default: Verdict) -> Policy:
    def rule(text: str, **kw: object) -> HostRule:
        return HostRule(parse_pattern(text), **kw)  # type: ignore[arg-type]

    return Policy(
        [
            rule("api.example.test"),
            rule("*.wild.example.test"),
            rule("txt.example.test", dns_types=frozenset({"TXT", "AXFR"})),
            rule("blocked.example.test", allow=False),
            rule("svc.example.test:8443"),
        ],
        default=default,
    )


@pytest.mark.parametrize(
    ("name", "qtype", "verdict", "rule", "reason", "rcode"),
    [
        ("API.Example.Test.", "A", "allow", "api.example.test", "rule", None),
        ("api.example.test", "aaaa", "allow", "api.example.test", "rule", None),
        ("a.wild.example.test", "A", "allow", "*.wild.example.test", "rule", None),
        ("svc.example.test", "A", "allow", "svc.example.test:8443", "rule", None),
        ("txt.example.test", "TXT", "allow", "txt.example.test", "rule", None),
        # meta types are refused whatever dns_types says; other types need dns_types
        ("txt.example.test", "AXFR", "deny", "txt.example.test", "axfr-refused", 5),
        ("txt.example.test", "MX", "deny", "txt.example.test", "mx-refused", 5),
        ("api.example.test", "TXT", "deny", "api.example.test", "txt-refused", 5),
        ("api.example.test", "TYPE65280", "deny", "api.example.test", "type65280-refused", 5),
        # a refused name is NXDOMAIN whatever the type
        ("blocked.example.test", "A", "deny", "blocked.example.test", "host-denied", 3),
        ("blocked.example.test", "TXT", "deny", "blocked.example.test", "host-denied", 3),
        ("wild.example.test", "A", "deny", None, "no-rule", 3),
        ("bad name.test", "A", "deny", None, "bad-name", 3),
    ],
)
def test_decide_name(
    name: str, qtype: str, verdict: str, rule: str | None, reason: str, rcode: int | None
) -> None:
    d = name_policy(Verdict.DENY).decide_name(name, qtype)
    assert (d.verdict.value, d.rule, d.reason) == (verdict, rule, reason)
    assert d.allowed is (verdict == "allow")
    if rcode is not None:
        assert d.status == rcode
    assert d.injections == ()


@pytest.mark.parametrize(
    ("default", "verdict", "reason"),
    [
        (Verdict.DENY, "deny", "no-rule"),
        (Verdict.WARN, "warn", "would-deny: no-rule"),
        (Verdict.ALLOW, "allow", "default-allow"),
    ],
)
def test_decide_name_default_verdict_comes_from_the_core(
    default: Verdict, verdict: str, reason: str
) -> None:
    p = name_policy(default)
    d = p.decide_name("unlisted.test", "AAAA")
    assert (d.verdict.value, d.rule, d.reason) == (verdict, None, reason)
    # Even where the default lets the name resolve, data-carrying types stay refused.
    txt = p.decide_name("unlisted.test", "TXT")
    expected = ("deny", "no-rule", 3) if default is Verdict.DENY else ("deny", "txt-refused", 5)
    assert (txt.verdict.value, txt.reason, txt.status) == expected
    # A rule's verdict does not depend on the default.
    assert p.decide_name("api.example.test").verdict is Verdict.ALLOW
    assert p.decide_name("blocked.example.test").verdict is Verdict.DENY
