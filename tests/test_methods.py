"""Every method a request could mean is decided: the request line (case-insensitively, HEAD as
GET), override headers, `_method` in the query and in form bodies; path-rule hosts refuse
ambiguous paths and send the canonical target; and a form body is read only bounded."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.compile import build_policy
from gateway.config.loader import parse_config_text
from gateway.policy import Decision, Plane, Policy, RequestFacts, Verdict
from gateway.policy.methods import (
    FORM_BODY_LIMIT,
    MethodSignals,
    form_overrides,
    is_token,
    meanings,
    query_overrides,
)

CONFIG = """
version: 1
egress:
  hosts:
    api.github.com:
      deny: ["DELETE /repos/**", "GET /secret/**", "/admin/**"]
    loose.example:
      deny: ["DELETE /repos/**"]
      ambiguous_paths: allow
    pypi.org: {}
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return build_policy(parse_config_text(CONFIG, "t.yaml").config)


def headers(*pairs: tuple[str, str]) -> MethodSignals:
    return MethodSignals.from_headers(lambda n: [v for k, v in pairs if k.lower() == n])


def decide(
    policy: Policy, method: str, path: str, signals: MethodSignals | None = None, host: str = ""
) -> Decision:
    facts = RequestFacts(
        Plane.MITM, method, "https", host or "api.github.com", 443, path,
        signals=signals or MethodSignals(),
    )  # fmt: skip
    return policy.decide(facts)


def test_policy_reads_methods_only_with_path_rules(policy: Policy) -> None:
    assert policy.reads_methods
    bare = build_policy(parse_config_text("version: 1\negress: {hosts: {a.b: {}}}", "t").config)
    assert not bare.reads_methods


@pytest.mark.parametrize(
    ("method", "path", "sig", "reason"),
    [
        ("delete", "/repos/o/r", None, "path-denied: DELETE /repos/**"),
        ("Delete", "/REPOS/o/r", None, "path-denied: DELETE /repos/**"),
        ("HEAD", "/secret/x", None, "path-denied: GET /secret/**"),
        ("POST", "/repos/o/r", headers(("X-HTTP-Method-Override", "DELETE")), "path-denied"),
        ("POST", "/repos/o/r", headers(("x-http-method", "delete")), "path-denied"),
        ("POST", "/repos/o/r", headers(("X-Method-Override", " Delete ")), "path-denied"),
        ("POST", "/repos/o/r", headers(("X-HTTP-Method-Override", "PATCH, DELETE")), "path-denied"),
        ("POST", "/secret/x", headers(("X-HTTP-Method-Override", "HEAD")), "path-denied"),
        ("POST", "/repos/o/r?_method=DELETE", None, "path-denied"),
        ("POST", "/repos/o/r?a=1;_method=delete", None, "path-denied"),
        ("POST", "/repos/o/r?%5Fmethod=DELETE", None, "path-denied"),
        ("POST", "/repos/o/r?_METHOD=DELETE", None, "path-denied"),
        ("POST", "/repos/o/r?_method[]=DELETE", None, "path-denied"),
        ("POST", "/repos/o/r?X-HTTP-Method-Override=DELETE", None, "path-denied"),
        ("POST", "/repos/o/r?x=1#&_method=DELETE", None, "ambiguous-path"),
        ("DELETE", "/x/..%2Frepos/o/r", None, "ambiguous-path: encoded-slash"),
        ("GET", "/a%2Fb", None, "ambiguous-path: encoded-slash"),  # anywhere on the host
        ("GET", "/admin;x/y", None, "ambiguous-path: path-parameter"),
        ("DEL ETE", "/x", None, "bad-method"),
        ("DELETE\r\nX: y", "/x", None, "bad-method"),
        ("", "/x", None, "bad-method"),
        ("DELETE", "/repos/o/r HTTP/1.1\r\nX: y", None, "bad-target"),
        ("GET", "/x\x00", None, "bad-target"),
        ("GET", "/search?q=a b", None, "bad-target"),
    ],
)
def test_denied(
    policy: Policy, method: str, path: str, sig: MethodSignals | None, reason: str
) -> None:
    d = decide(policy, method, path, sig)
    assert d.verdict is Verdict.DENY and d.reason.startswith(reason), d
    assert d.plan is None and d.target is None


@pytest.mark.parametrize(
    ("method", "path", "sig"),
    [
        ("GET", "/repos/o/r", None),
        ("POST", "/repos/o/r", headers(("X-HTTP-Method-Override", "PATCH"))),
        ("HEAD", "/repos/o/r", None),
        ("POST", "/repos/o/r?method=DELETE&x_method=DELETE", None),
        ("GET", "/search?q=%2F;%25", None),
    ],
)
def test_allowed(policy: Policy, method: str, path: str, sig: MethodSignals | None) -> None:
    assert decide(policy, method, path, sig).allowed


def test_status_codes(policy: Policy) -> None:
    assert decide(policy, "GET", "/a%2Fb").status == 400
    assert decide(policy, "DEL ETE", "/a").status == 400
    assert decide(policy, "DELETE", "/repos/a").status == 403
    # a raw control character is refused on every host, path rules or not
    assert decide(policy, "GET", "/a\r\nX: y", host="pypi.org").reason == "bad-target"


def test_target_is_the_canonical_path_and_the_query_as_sent(policy: Policy) -> None:
    d = decide(policy, "GET", "/x/../%72epos//o/./r?q=%2F&_x=1")
    assert d.allowed and d.target == "/repos/o/r?q=%2F&_x=1"
    assert d.methods == ("GET",)
    # hosts without path rules: the planes send what the client wrote
    assert decide(policy, "GET", "/a/../b", host="pypi.org").target is None


def test_ambiguous_paths_allow_matches_and_sends_the_canonical_form(policy: Policy) -> None:
    ok = decide(policy, "DELETE", "/x;v=1/a%2Fb", host="loose.example")
    assert ok.allowed and ok.target == "/x;v=1/a%2Fb"
    d = decide(policy, "DELETE", "/Repos\\o", host="loose.example")
    assert d.verdict is Verdict.DENY and d.reason == "path-denied: DELETE /repos/**"
    assert decide(policy, "GET", "/x/..\\repos", host="loose.example").target == "/repos"
    # no path rules: no refusal for ambiguity (nothing to dodge)
    assert decide(policy, "GET", "/a%2Fb;c", host="pypi.org").allowed


FORM = "application/x-www-form-urlencoded"


def form(data: bytes, ctype: str = FORM, **kw: object) -> MethodSignals:
    base = headers(("Content-Type", ctype), ("Content-Length", str(len(data))))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_form_body_is_asked_for_only_where_it_could_matter(policy: Policy) -> None:
    body = b"a=1&_method=DELETE"
    pending = decide(policy, "POST", "/repos/o/r", form(body))
    assert pending.verdict is Verdict.DENY and pending.body_limit == len(body)
    assert pending.reason == "form-body-pending"
    final = decide(policy, "POST", "/repos/o/r", form(body, body=body))
    assert final.verdict is Verdict.DENY and final.reason == "path-denied: DELETE /repos/**"
    ok = decide(policy, "POST", "/repos/o/r", form(b"a=1", body=b"a=1"))
    assert ok.allowed and ok.target == "/repos/o/r"
    # no rule matches the path for any method: never read, never refused
    assert decide(policy, "POST", "/user/x", form(body)).allowed
    # not a form: streamed as before
    assert decide(policy, "POST", "/repos/o/r", form(body, "application/json")).allowed
    # an empty form needs no reading
    assert decide(policy, "POST", "/repos/o/r", form(b"")).allowed


def test_form_body_bounds(policy: Policy) -> None:
    big = form(b"", content_length=FORM_BODY_LIMIT + 1)
    assert decide(policy, "POST", "/repos/o/r", big).reason == "form-too-large"
    assert decide(policy, "POST", "/repos/o/r", big).status == 413
    unsized = form(b"", content_length=None)
    assert decide(policy, "POST", "/repos/o/r", unsized).status == 411
    gz = form(b"xx", content_encoding="gzip")
    assert decide(policy, "POST", "/repos/o/r", gz).reason == "form-body-encoded"
    dup = headers(("Content-Type", FORM), ("Content-Length", "5"), ("Content-Length", "5"))
    assert decide(policy, "POST", "/repos/o/r", dup).reason == "form-length-required"


MP = "multipart/form-data; boundary=XyZ"


def multipart(*parts: tuple[str, str]) -> bytes:
    out = b""
    for disposition, value in parts:
        out += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n".encode()
    return out + b"--XyZ--\r\n"


@pytest.mark.parametrize(
    "body",
    [
        multipart(('form-data; name="a"', "1"), ('form-data; name="_method"', "DELETE")),
        multipart(("form-data; name=_method", "delete")),
        multipart(('form-data; NAME="_Method"', "DELETE")),
        multipart(("form-data; name*=utf-8''%5Fmethod", "DELETE")),
        multipart(('form-data; name="X-HTTP-Method-Override"', "DELETE")),
    ],
)
def test_multipart_method_field(policy: Policy, body: bytes) -> None:
    d = decide(policy, "POST", "/repos/o/r", form(body, MP, body=body))
    assert d.verdict is Verdict.DENY and d.reason == "path-denied: DELETE /repos/**"


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data", b"--XyZ\r\n\r\n--XyZ--"),  # no boundary
        ('multipart/form-data; boundary=a; boundary="b"', b"--a\r\n\r\n--a--"),
        (MP, b"preamble\r\n" + multipart(("form-data; name=a", "1"))),
        (MP, b'--XyZ\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE'),
    ],
)
def test_unreadable_multipart_is_refused(policy: Policy, ctype: str, body: bytes) -> None:
    d = decide(policy, "POST", "/repos/o/r", form(body, ctype, body=body))
    assert d.verdict is Verdict.DENY and d.reason == "ambiguous-form"


def test_helpers() -> None:
    assert meanings("head", ["delete, patch"]) == (
        "HEAD",
        "DELETE, PATCH",
        "DELETE",
        "PATCH",
        "GET",
    )
    assert query_overrides("?a=1&_method=PUT;x-http-method=GET") == ["PUT", "GET"]
    assert query_overrides("?nothing=here") == []
    assert form_overrides(FORM, b"_method=DELETE+") == ["DELETE "]
    assert form_overrides("text/plain", b"_method=DELETE") == []
    assert is_token("M-SEARCH") and not is_token("GET ") and not is_token("G\x00T")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["DELETE", "delete", "Delete", " DELETE", "DELETE\t", "DeLeTe"]),
    st.sampled_from(["header", "query", "form", "multipart"]),
    st.sampled_from(
        ["_method", "_METHOD", "%5Fmethod", "X-HTTP-Method-Override", "x-method-override"]
    ),
)
def test_any_spelling_of_an_override_is_denied(value: str, where: str, name: str) -> None:
    p = build_policy(parse_config_text(CONFIG, "t.yaml").config)
    sig = MethodSignals()
    path = "/repos/o/r"
    if where == "header":
        if name.startswith(("_", "%")):
            name = "X-HTTP-Method"
        sig = headers((name, value))
    elif where == "query":
        path += f"?{name}={value.replace(' ', '+').replace(chr(9), '%09')}"
    elif where == "form":
        body = f"{name}={value}".encode()
        sig = form(body, body=body)
    else:
        body = multipart((f'form-data; name="{name}"', value))
        sig = form(body, MP, body=body)
    d = decide(p, "POST", path, sig)
    assert d.verdict is Verdict.DENY and d.reason.startswith("path-denied"), (where, name, d)
