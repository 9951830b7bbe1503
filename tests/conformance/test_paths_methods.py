"""Attacks on `deny:` path rules: forms of a denied request that some server reads as the denied
path or method while a naive gateway reads something harmless.

Each attack is sent byte for byte by a hostile agent (tests/conformance/attack_client.py): on the
mitm plane through `keyward run`'s explicit proxy, on the services plane, and in a pod in
transparent mode (HTTPS and plain HTTP through mitmproxy). An attack
fails (the test passes) when the agent gets a refusal (4xx, never a hang or a 2xx) and the fake
upstream never saw the request at all: the assertion is on what the upstream received.

Every attack here got through before path canonicalisation (it reached the upstream with the
real key attached); the forms that were already handled (`..`, `//`, `%72`) are unit tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.writer import redact_query
from tests.support.world import REAL_KEY, make_world

# every case runs once per plane and mode in module fixtures: minutes of set-up
pytestmark = pytest.mark.slow

CLIENT = Path(__file__).with_name("attack_client.py")
HOST = "api.example.test"
RULES = '["DELETE /repos/**", "PUT /repos/*/*/collaborators/**", "GET /secret/**"]'
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Attack:
    id: str
    cls: str  # the attack class, for the tally in the report
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    chunked: bool = False
    h2: bool = False

    def spec(self, where: dict[str, Any], tag: str) -> dict[str, Any]:
        """The attack as attack_client.py takes it (`where`: host, port, tls, tunnel), tagged so
        the upstream's log tells each plane's attempt apart."""
        host = where.get("host_header", where["host"])
        out = {k: v for k, v in where.items() if k != "host_header"} | {"name": tag}
        if self.h2:
            pseudo = [
                (":method", self.method),
                (":path", self.target),
                (":scheme", "https"),
                (":authority", host),
            ]
            return out | {"h2": True, "headers": [*pseudo, ("x-attack", tag)]}
        lines = [
            f"{self.method} {self.target} HTTP/1.1",
            f"Host: {host}",
            f"X-Attack: {tag}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        body = self.body or b""
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif self.body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return out | {"raw": ["\r\n".join(lines) + "\r\n\r\n" + body.decode("latin-1")]}


def _multipart(name: str, value: str) -> bytes:
    return (
        f'--kwB\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
        f'--kwB\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n--kwB--\r\n'
    ).encode()


D, R = "DELETE", "/repos/o/r"
OVR = "X-HTTP-Method-Override"
ATTACKS = [
    # case: Express, ASP.NET and Spring (optionally) route case-insensitively
    Attack("case-segment", "case", D, "/Repos/o/r"),
    Attack("case-upper", "case", D, "/REPOS/O/R"),
    Attack("case-via-escape", "case", D, "/%52epos/o/r"),
    # encoded separators: Werkzeug/WSGI, nginx and Go's URL.Path decode %2F to /
    Attack("encoded-slash", "encoded-separator", D, "/repos%2Fo%2Fr"),
    Attack("encoded-slash-lower", "encoded-separator", D, "/repos%2fo/r"),
    Attack("dotdot-encoded-slash", "encoded-separator", D, "/x/..%2Frepos/o/r"),
    Attack("dotdot-encoded-backslash", "encoded-separator", D, "/x/..%5Crepos/o/r"),
    Attack("encoded-backslash-lower", "encoded-separator", D, "/repos%5co/r"),
    # raw backslash: WHATWG parsers (Node's URL, browsers) read \ as /
    Attack("raw-backslash", "backslash", D, "/x/..\\repos/o/r"),
    Attack("raw-backslash-separator", "backslash", D, "/repos\\o\\r"),
    # path parameters: Tomcat/Spring drop ;params before routing
    Attack("matrix-param", "path-parameter", D, "/repos;v=1/o/r"),
    Attack("dotdot-semicolon", "path-parameter", D, "/x/..;/repos/o/r"),
    Attack("encoded-semicolon", "path-parameter", D, "/repos%3Bv=1/o/r"),
    # double encoding: a second decoder (a proxy then a framework) turns %2572 into r
    Attack("double-encoded-letter", "double-encoding", D, "/%2572epos/o/r"),
    Attack("double-encoded-slash", "double-encoding", D, "/x/..%252Frepos/o/r"),
    # invalid escapes and bytes: IIS %u, overlong UTF-8 separators, NUL truncation (C servers)
    Attack("iis-u-escape", "invalid-escape", D, "/%u0072epos/o/r"),
    Attack("overlong-utf8-slash", "invalid-escape", D, "/x/..%C0%AFrepos/o/r"),
    Attack("nul-truncation", "control-character", D, "/repos%00.json/o/r"),
    # compatibility forms that NFKC folds to ASCII (fullwidth r)
    Attack("fullwidth-letter", "unicode-lookalike", D, "/%EF%BD%92epos/o/r"),
    # a raw fragment: some servers strip it, others resolve the dot segments after it
    Attack("raw-fragment", "fragment", D, "/x#/../repos/o/r"),
    # HEAD is served by the GET handler (Flask, Go's ServeMux, Express)
    Attack("head-as-get", "method", "HEAD", "/secret/x"),
    # method overrides in headers (Express method-override, Symfony, ASP.NET, Google APIs)
    Attack("x-http-method-override", "override-header", "POST", R, ((OVR, "DELETE"),), b""),
    Attack("x-http-method", "override-header", "POST", R, (("X-HTTP-Method", "DELETE"),), b""),
    Attack("x-method-override", "override-header", "POST", R, (("X-Method-Override", D),), b""),
    Attack("override-lowercase", "override-header", "POST", R, ((OVR.lower(), "delete"),), b""),
    Attack("override-list", "override-header", "POST", R, ((OVR, "PATCH, DELETE"),), b""),
    Attack(
        "override-put-collaborators",
        "override-header",
        "POST",
        R + "/collaborators/u",
        ((OVR, "PUT"),),
        b"",
    ),
    Attack("override-head-as-get", "override-header", "POST", "/secret/x", ((OVR, "HEAD"),), b""),
    # _method in the query (Laravel, Symfony; ASP.NET reads X-HTTP-Method-Override there too)
    Attack("query-method", "override-query", "POST", R + "?_method=DELETE", body=b""),
    Attack("query-method-encoded", "override-query", "POST", R + "?%5Fmethod=delete", body=b""),
    Attack("query-method-semicolon", "override-query", "POST", R + "?a=1;_method=DELETE", body=b""),
    Attack("query-aspnet-override", "override-query", "POST", R + f"?{OVR}=DELETE", body=b""),
    # _method in a form body (Rails' Rack::MethodOverride, Laravel, Symfony)
    Attack(
        "form-method",
        "override-form",
        "POST",
        R,
        (("Content-Type", FORM),),
        b"title=x&_method=DELETE",
    ),
    Attack(
        "form-method-odd-type",
        "override-form",
        "POST",
        R,
        (("Content-Type", "Application/X-WWW-Form-Urlencoded; charset=utf-8"),),
        b"_method=delete",
    ),
    Attack(
        "form-multipart-method",
        "override-form",
        "POST",
        R,
        (("Content-Type", "multipart/form-data; boundary=kwB"),),
        _multipart("_method", D),
    ),
    Attack(
        "form-past-the-bound",
        "override-form",
        "POST",
        R,
        (("Content-Type", FORM),),
        b"pad=" + b"x" * 70000 + b"&_method=DELETE",
    ),
    Attack(
        "form-chunked",
        "override-form",
        "POST",
        R,
        (("Content-Type", FORM),),
        b"_method=DELETE",
        chunked=True,
    ),
    # combined: override + case
    Attack("override-and-case", "override-query", "POST", "/Repos/o/r?_method=delete", body=b""),
]
H2_ATTACKS = [
    # HTTP/2 carries the target as a header value: raw CR/LF in it became a header of the
    # HTTP/1.1 request upstream, and the rule never matched the path with a newline in it
    Attack(
        "h2-path-crlf-injection", "control-character", D, "/repos/o/r HTTP/1.1\r\nX-A: 1", h2=True
    ),
    Attack("h2-case-segment", "case", D, "/Repos/o/r", h2=True),
]

# Not attacks but the other half of the promise: an allowed request on a host with path rules
# reaches the upstream with exactly the path that was decided (canonical form, query as sent),
# form bodies read for `_method` arrive intact. (Id, request, the raw path the upstream must see.)
CONTROLS = [
    (
        Attack("sent-as-decided-dots", "decided-path", "GET", "/user/./x/../y//z?q=%2F&r=1"),
        "/user/y/z?q=%2F&r=1",
    ),
    (Attack("sent-as-decided-escapes", "decided-path", "GET", "/%75ser/%7ename"), "/user/~name"),
    (
        Attack(
            "sent-as-decided-form",
            "decided-path",
            "POST",
            "/repos/o/r/./issues",
            (("Content-Type", FORM),),
            b"title=x&method=DELETE",
        ),
        "/repos/o/r/issues",
    ),
    (Attack("sent-as-decided-head", "decided-path", "HEAD", "/repos/o//r"), "/repos/o/r"),
]
CONTROL_ATTACKS = [c for c, _ in CONTROLS]


@dataclass
class Outcome:
    responses: dict[str, dict[str, Any]]
    seen: list[dict[str, Any]]  # what the fake upstream received
    audit: list[dict[str, Any]]


def _attempt_ok(outcome: Outcome, attack: Attack, tag: str) -> None:
    """The attack failed: refused with a status (no hang, no 2xx) and never seen upstream."""
    got = outcome.responses[attack.id]
    reached = [s for s in outcome.seen if _header(s, "x-attack") == tag]
    assert reached == [], f"{attack.id} reached the upstream: {reached[0]}"
    refused = 400 <= got["status"] < 500 or (got["status"] == 0 and got["error"] is None)
    assert refused, f"{attack.id}: {got}"


def _sent_as_decided(
    outcome: Outcome, control: Attack, expected: str, tag: str, credentialed: bool = True
) -> None:
    got = outcome.responses[control.id]
    hits = [s for s in outcome.seen if _header(s, "x-attack") == tag]
    assert got["status"] == 200 and len(hits) == 1, (got, hits)
    assert (hits[0]["method"], hits[0]["raw_path"]) == (control.method, expected)
    if credentialed:  # written after the decision, also one made after reading a form body
        assert _header(hits[0], "authorization") == f"Bearer {REAL_KEY}"
    if control.body:
        assert control.body.decode() in got["body"]


def _header(record: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in record["headers"].items() if k.lower() == name), None)


def _specs(plane: str, where: dict[str, Any], attacks: list[Attack]) -> list[dict[str, Any]]:
    return [a.spec(where, f"{plane}:{a.id}") for a in attacks]


def _outcome(plane: str, results: dict[str, Any], seen: list[Any], audit: list[Any]) -> Outcome:
    """attack_client.py's results for one plane, keyed by attack id: the first response."""
    responses = {}
    for name, r in results.items():
        p, _, attack_id = name.partition(":")
        if p == plane:
            responses[attack_id] = {
                "status": (r.get("statuses") or [0])[0],
                "reason": (r.get("reasons") or [None])[0],
                "error": r.get("error"),
                "body": r.get("body", ""),
            }
    return Outcome(responses, seen, audit)


# -- explicit proxy (`keyward run`): the mitm plane and the services plane ------------------------
CONFIG_HEAD = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: RULES
""".replace("RULES", RULES)
EXPLICIT_CONFIG = (
    CONFIG_HEAD
    + """services:
  api: {{ listen: 0, upstream: "https://api.example.test" }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "127.0.0.1:{port}"
audit:
  path: audit.jsonl
"""
)

# The agent fills in the service's port (known only once `keyward run` has started it).
AGENT = """
import json, os, subprocess, sys
port = int(os.environ["KEYWARD_SERVICE_API_URL"].rsplit(":", 1)[1])
attacks = [a | {"port": a["port"] or port} for a in json.loads(sys.stdin.read())]
r = subprocess.run([sys.executable, sys.argv[1]], input=json.dumps(attacks), text=True,
                   capture_output=True, timeout=900)
sys.stderr.write(r.stderr)
print(r.stdout.strip().splitlines()[-1])
"""
MITM = {"host": HOST, "port": 443, "tls": True, "tunnel": True}
SERVICE = {"host": "127.0.0.1", "port": 0, "tls": False, "tunnel": False}


async def _explicit(tmp: Path) -> dict[str, Outcome]:
    world = await make_world(tmp, EXPLICIT_CONFIG)
    try:
        specs = [
            *_specs("mitm", MITM, ATTACKS + H2_ATTACKS + CONTROL_ATTACKS),
            *_specs("service", SERVICE, ATTACKS + CONTROL_ATTACKS),
        ]
        proc = await asyncio.create_subprocess_exec(
            *world.run_argv(sys.executable, "-c", AGENT, str(CLIENT)),
            env=world.env(),
            cwd=world.dir,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(specs).encode()), 600)
        assert proc.returncode == 0, err.decode()[-3000:]
        assert REAL_KEY not in out.decode() + err.decode()
        results = json.loads(out.decode().strip().splitlines()[-1])
        seen: list[dict[str, Any]] = world.upstream.seen.requests  # type: ignore[assignment]
        audit = world.audit()
        return {plane: _outcome(plane, results, seen, audit) for plane in ("mitm", "service")}
    finally:
        await world.upstream.close()


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return asyncio.run(_explicit(tmp_path_factory.mktemp("paths-methods")))


@pytest.mark.parametrize("attack", ATTACKS + H2_ATTACKS, ids=lambda a: a.id)
def test_mitm_explicit(explicit: dict[str, Outcome], attack: Attack) -> None:
    _attempt_ok(explicit["mitm"], attack, f"mitm:{attack.id}")
    if not attack.h2:  # a refusal is audited (the h2 method never was a valid request)
        assert any(
            r["decision"] == "deny" and r["path"] == redact_query(attack.target)
            for r in explicit["mitm"].audit
        ), attack.id


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.id)
def test_service_plane(explicit: dict[str, Outcome], attack: Attack) -> None:
    _attempt_ok(explicit["service"], attack, f"service:{attack.id}")


@pytest.mark.parametrize(("control", "expected"), CONTROLS, ids=lambda c: getattr(c, "id", ""))
@pytest.mark.parametrize("plane", ["mitm", "service"])
def test_explicit_upstream_gets_the_decided_path(
    explicit: dict[str, Outcome], plane: str, control: Attack, expected: str
) -> None:
    _sent_as_decided(explicit[plane], control, expected, f"{plane}:{control.id}")


# -- transparent mode in a pod: HTTPS and plain HTTP through mitmproxy ------------------------
POD_CONFIG = (
    CONFIG_HEAD
    + """    "plain.example.test:80":
      deny: RULES
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "{api}:443"
    "plain.example.test:80": "{api}:80"
audit:
  path: {audit}
""".replace("RULES", RULES)
)


@pytest.fixture(scope="module")
def pod(root_ok: None) -> Iterator[dict[str, Outcome]]:
    from tests.support.pod import pod_world

    names = ("api.example.test", "plain.example.test")
    with pod_world(POD_CONFIG, names, {"TEST_API_KEY": REAL_KEY}) as world:
        client = world.pod.work / "attack_client.py"
        shutil.copy(CLIENT, client)
        os.chmod(client, 0o644)
        attacks = [
            *_specs(
                "pod",
                {"host": HOST, "port": 443, "tls": True, "tunnel": False},
                ATTACKS + H2_ATTACKS + CONTROL_ATTACKS,
            ),
            *_specs(
                "plain",
                {"host": "plain.example.test", "port": 80, "tls": False, "tunnel": False},
                ATTACKS + CONTROL_ATTACKS,
            ),
        ]
        r = world.pod.run_agent(
            [sys.executable, str(client)], input=json.dumps(attacks), timeout=900
        )
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads(r.stdout.strip().splitlines()[-1])
        seen, audit = world.seen(), world.audit()
        outcomes = {
            "transparent": _outcome("pod", results, seen, audit),
            "plain": _outcome("plain", results, seen, audit),
        }
        yield outcomes


@pytest.mark.root
@pytest.mark.parametrize("attack", ATTACKS + H2_ATTACKS, ids=lambda a: a.id)
def test_pod_transparent_https(pod: dict[str, Outcome], attack: Attack) -> None:
    _attempt_ok(pod["transparent"], attack, f"pod:{attack.id}")


@pytest.mark.root
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.id)
def test_pod_transparent_plain_http(pod: dict[str, Outcome], attack: Attack) -> None:
    _attempt_ok(pod["plain"], attack, f"plain:{attack.id}")


@pytest.mark.root
@pytest.mark.parametrize(("control", "expected"), CONTROLS, ids=lambda c: getattr(c, "id", ""))
@pytest.mark.parametrize(("run", "tag"), [("transparent", "pod"), ("plain", "plain")])
def test_pod_upstream_gets_the_decided_path(
    pod: dict[str, Outcome], run: str, tag: str, control: Attack, expected: str
) -> None:
    _sent_as_decided(pod[run], control, expected, f"{tag}:{control.id}", run == "transparent")
