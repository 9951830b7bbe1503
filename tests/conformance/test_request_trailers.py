"""Request trailers: fields that arrive after the body was decided and streamed. A hostile agent
puts what the head could not carry into them: an `Authorization` over the injected one, another
`Host`, a method override, a framing field, a placeholder (of this host's secret, or of another
host's), a real secret value. The policy never saw them, and an upstream that merges trailers into
the head would act on them.

Decided behaviour: trailers are never a place where a placeholder is swapped; framing, routing,
credential, request-modifier and method-override fields (and any field the rule writes) are
dropped; a placeholder of a secret this host does not use, or a real secret value, drops its
field; a placeholder of this host's secret passes unchanged. Each of these makes the request an
alert. The service plane cannot relay trailers at all (aiohttp's server reads and discards them,
its client cannot send any): none reach the upstream.

Tried on the mitm plane (HTTP/1.1 chunked and HTTP/2) and the service plane, under `keyward run`
(explicit) and in a pod (transparent; HTTP/1.1, which is what the pod's upstream speaks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.test_response_echo import hostile_pod, read_audit, start_hostile
from tests.conformance.wire import LoopThread
from tests.support.h2upstream import H2Upstream
from tests.support.pki import make_ca

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "conformance" / "attack_client.py"
REAL_KEY = "sk-test-TRAILERSECRET-0123456789abcdef"
OTHER_KEY = "ot-test-OTHERSECRET-9876543210fedcba"
API, H2, API_IP = "api.example.test", "h2.example.test", "203.0.113.10"
POD_SERVICE_PORT = 18702

CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
  other: {{ env: TEST_OTHER_KEY }}
egress:
  default: deny
  hosts:
    {api}:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /**"]
    {h2}:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /**"]
    other.example.test:
      headers: {{ X-Key: "{{other}}" }}
placeholders:
  TEST_API_KEY: {{ secret: key }}
  TEST_OTHER_KEY: {{ secret: other }}
services:
  api: {{ listen: {service_port}, upstream: "https://{api}" }}
upstream:
  ca_bundle: {ca}
  resolve:
    "{api}:443": "{target}"
    "{h2}:443": "127.0.0.1:{h2port}"
audit:
  path: {audit}
"""

# (name, value): what a hostile agent puts in request trailers.
SMUGGLED = [
    ("Authorization", "Bearer smuggled-credential"),
    ("Host", "evil.example.test"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("Content-Length", "0"),
    ("Cookie", "session=smuggled"),
    ("X-Note", "note {env:TEST_API_KEY}"),  # this host's placeholder: passes, never swapped
    ("X-Wrong", "{env:TEST_OTHER_KEY}"),  # another host's placeholder: dropped
    ("X-Real", REAL_KEY),  # a real value: dropped
    ("X-Checksum", "crc32=abcd"),  # an ordinary trailer: passes
]
KEPT = {"x-note", "x-checksum"}


def h1_attack(name: str, host: str, smuggled: list[tuple[str, str]] = SMUGGLED) -> str:
    fields = "".join(f"{k}: {v}\r\n" for k, v in smuggled)
    return (
        f"POST /trl/{name} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Trailer: Authorization, Host\r\nConnection: close\r\n\r\n"
        f"5\r\nhello\r\n0\r\n{fields}\r\n"
    )


def h2_attack(name: str) -> dict[str, Any]:
    return {
        "name": name, "h2": True, "host": H2, "port": 443,
        "headers": [(":method", "POST"), (":scheme", "https"), (":path", f"/trl/{name}"),
                    (":authority", H2)],
        "body": "hello",
        "trailers": [(k.lower(), v) for k, v in SMUGGLED if k.lower() not in ("host",)],
    }  # fmt: skip


@dataclass
class Seen:
    """Per attack: the agent's result, what the upstream received (head and trailers), audit."""

    results: dict[str, Any]
    upstream: dict[str, dict[str, Any]]
    audit: list[dict[str, Any]]

    def record(self, name: str) -> dict[str, Any]:
        hits = [r for r in self.audit if str(r.get("path", "")) == f"/trl/{name}"]
        assert len(hits) == 1, (name, self.audit)
        return hits[0]


def _hostile_seen(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if r["path"].startswith("/trl/"):
            out[r["path"][5:]] = {"headers": r["headers"], "trailers": r["trailers"]}
    return out


def _attacks(service_port: int | str, transparent: bool) -> list[dict[str, Any]]:
    service = {"host": "127.0.0.1", "port": service_port, "tls": False, "tunnel": False}
    authority = f"127.0.0.1:{service_port}"
    no_host = [(k, v) for k, v in SMUGGLED if k not in ("Host", "Content-Length")]
    out = [
        {"name": "mitm", "host": API, "port": 443, "raw": [h1_attack("mitm", API)]},
        {"name": "service", **service, "raw": [h1_attack("service", authority, no_host)]},
        {"name": "service-host", **service, "raw": [h1_attack("service-host", authority)]},
    ]
    if not transparent:
        out.append(h2_attack("h2"))
    return out


@pytest.fixture(scope="module")
def explicit() -> Iterator[Seen]:
    base = Path(tempfile.mkdtemp(prefix="keyward-trailers-"))
    lt = LoopThread()
    proc, ports = start_hostile(base / "upstream", [], "127.0.0.1", 0, 0)
    try:
        ca = make_ca(base / "pki", name="keyward test HTTP/2 upstream CA")
        h2: H2Upstream = lt.run(H2Upstream.start(ca.server_context(base / "pki", H2)))
        bundle = base / "bundle.pem"
        bundle.write_text(ca.path.read_text() + (base / "upstream/pki/test-ca.pem").read_text())
        config = base / "keyward.yaml"
        config.write_text(CONFIG.format(
            api=API, h2=H2, ca=bundle, target=f"127.0.0.1:{ports['tls']}", h2port=h2.port,
            service_port=0, audit=base / "audit.jsonl"))  # fmt: skip
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env.update(TEST_API_KEY=REAL_KEY, TEST_OTHER_KEY=OTHER_KEY,
                   KEYWARD_STATE=str(base / "state"), PYTHONPATH=str(ROOT))  # fmt: skip
        script = (
            "import io, os, runpy, sys\n"
            "port = os.environ['KEYWARD_SERVICE_API_URL'].rsplit(':', 1)[1].strip('/')\n"
            "sys.stdin = io.StringIO(sys.stdin.read().replace('__SERVICE_PORT__', port))\n"
            f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')\n"
        )
        attacks = json.dumps(_attacks("__SERVICE_PORT__", False)).replace(
            '"__SERVICE_PORT__"', "__SERVICE_PORT__"
        )
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(config), "--",
             sys.executable, "-c", script],
            input=attacks, env=env, cwd=base, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads(r.stdout.strip().splitlines()[-1])
        seen = _hostile_seen(base / "upstream" / "seen.jsonl")
        for s in h2.seen.streams:
            path = str(s["pseudo"][":path"])  # type: ignore[index]
            if path.startswith("/trl/"):
                heads = dict(s["headers"])  # type: ignore[arg-type]
                seen[path[5:]] = {"headers": heads, "trailers": dict(s["trailers"])}  # type: ignore[arg-type]
        audit = [json.loads(x) for x in (base / "audit.jsonl").read_text().splitlines() if x]
        yield Seen(results, seen, audit)
        lt.run(h2.close())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        lt.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def transparent(root_ok: None) -> Iterator[Seen]:
    def config(ca: Path, audit: Path) -> str:
        return CONFIG.format(api=API, h2=H2, ca=ca, target=f"{API_IP}:443", h2port=9,
                             service_port=POD_SERVICE_PORT, audit=audit)  # fmt: skip

    env = {"TEST_API_KEY": REAL_KEY, "TEST_OTHER_KEY": OTHER_KEY}
    with hostile_pod("keyward-trailers-pod-", config, env) as (pod, base):
        attacks = json.dumps(_attacks(POD_SERVICE_PORT, True))
        r = pod.run_agent([sys.executable, str(CLIENT)], input=attacks, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads(r.stdout.strip().splitlines()[-1])
        seen = _hostile_seen(base / "upstream" / "seen.jsonl")
        yield Seen(results, seen, read_audit(base))


@pytest.fixture(params=["explicit", "transparent"])
def seen(request: pytest.FixtureRequest) -> Seen:
    if request.param == "transparent":
        request.applymarker(pytest.mark.root)
        from tests.conftest import require_root

        require_root()
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def _mitm_checks(seen: Seen, name: str, host: str) -> None:
    assert seen.results[name]["statuses"][:1] == [200], seen.results[name]
    got = seen.upstream[name]
    head = {k.lower(): v for k, v in got["headers"].items()}
    assert head["authorization"] == f"Bearer {REAL_KEY}"  # the injected one, alone
    assert head.get("host", head.get(":authority", host)) == host
    assert set(got["trailers"]) == KEPT, got["trailers"]
    note = got["trailers"]["x-note"]
    assert note.startswith("note ") and REAL_KEY not in note  # passed, never swapped
    assert OTHER_KEY not in json.dumps(got) and "smuggled" not in json.dumps(got["trailers"])
    rec = seen.record(name)
    assert rec["decision"] == "allow" and rec["alert"] is True


def test_http1_request_trailers_cannot_smuggle_fields_on_the_mitm_plane(seen: Seen) -> None:
    _mitm_checks(seen, "mitm", API)


def test_h2_request_trailers_cannot_smuggle_fields_on_the_mitm_plane(explicit: Seen) -> None:
    _mitm_checks(explicit, "h2", H2)


def test_service_plane_drops_request_trailers(seen: Seen) -> None:
    assert seen.results["service"]["statuses"][:1] == [200], seen.results["service"]
    got = seen.upstream["service"]
    assert got["trailers"] == {}
    assert got["headers"]["authorization"] == f"Bearer {REAL_KEY}"
    assert got["headers"]["host"] == API


def test_service_plane_refuses_host_or_framing_in_trailers(seen: Seen) -> None:
    """aiohttp checks trailer fields with the head: a second Host or a Content-Length ends the
    request with 400; whatever reached the upstream carried no trailer."""
    assert seen.results["service-host"]["statuses"][:1] in ([200], [400])
    got = seen.upstream.get("service-host")
    assert got is None or got["trailers"] == {}


def test_no_secret_in_the_audit(seen: Seen) -> None:
    blob = json.dumps(seen.audit)
    assert REAL_KEY not in blob and OTHER_KEY not in blob
