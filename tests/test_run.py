"""`keyward run`: real clients under an in-process gateway, real TLS to fake upstreams."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.world import KEYWARD, REAL_KEY, World, make_world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    await w.upstream.close()


async def run(world: World, *cmd: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(*cmd),
        env=world.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=world.dir,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def assert_no_secret(world: World, *texts: str) -> None:
    for text in texts:
        assert REAL_KEY not in text
    assert REAL_KEY not in world.audit_path.read_text()


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_gets_key_injected_and_agent_auth_replaced(world: World) -> None:
    code, out, err = await run(
        world,
        "curl",
        "-sS",
        "-H",
        "Authorization: Bearer agent-made-up",
        "https://api.example.test/v1/models?api_key=zzz",
    )
    assert code == 0, err
    echoed = json.loads(out)
    # the upstream saw the real key; the echo back to the agent is scrubbed
    seen = world.upstream.seen.requests[-1]["headers"]
    assert seen["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    assert echoed["headers"]["Authorization"] == "Bearer [REDACTED]"
    assert "1 allowed, 0 denied, 1 with credentials" in err
    rec = world.audit()[-1]
    assert rec["decision"] == "allow" and rec["host"] == "api.example.test"
    assert rec["injected"] == [{"secret": "key", "location": "header:Authorization"}]
    assert rec["status"] == 200 and "zzz" not in json.dumps(rec)
    assert_no_secret(world, out, err)


@pytest.mark.parametrize(
    "client",
    [
        "import urllib.request as u; print(u.urlopen('https://api.example.test/x').read().decode())",
        "import requests; print(requests.get('https://api.example.test/x').text)",
        "import httpx; print(httpx.get('https://api.example.test/x').text)",
        """
        import asyncio, httpx
        async def main():
            async with httpx.AsyncClient() as c:
                print((await c.get('https://api.example.test/x')).text)
        asyncio.run(main())
        """,
        """
        import asyncio, aiohttp
        async def main():
            async with aiohttp.ClientSession(trust_env=True) as s:
                async with s.get('https://api.example.test/x') as r:
                    print(await r.text())
        asyncio.run(main())
        """,
    ],
    ids=["urllib", "requests", "httpx", "httpx-async", "aiohttp"],
)
async def test_python_clients_get_key_injected(world: World, client: str) -> None:
    code, out, err = await run(world, *py(client))
    assert code == 0, err
    assert world.upstream.seen.requests[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    assert json.loads(out)["path"] == "/x"
    assert_no_secret(world, out, err)


async def test_policy_outcomes_through_the_proxy(world: World) -> None:
    """Precedence, denials, placeholders and spoofing, from one agent process."""
    code, out, err = await run(
        world,
        *py(
            """
            import json, os, requests
            key = os.environ["TEST_API_KEY"]
            def get(url, method="GET", **kw):
                try:
                    r = requests.request(method, url, timeout=20, **kw)
                    return [r.status_code, r.headers.get("X-Keyward-Reason"), r.text]
                except Exception as e:
                    return [0, type(e).__name__, str(e)[:200]]
            print(json.dumps({
                "port_rule": get("https://api.example.test:8443/p"),
                "host_rule": get("https://api.example.test/p"),
                "wild": get("https://a.wild.example.test/p"),
                "deny_default": get("https://evil.example.test/p"),
                "deny_default_curl": __import__("subprocess").run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "https://evil.example.test/p"], capture_output=True, text=True).stdout,
                "deny_path": get("https://api.example.test/admin/../admin/x", "DELETE"),
                "placeholder_ok": get("https://api.example.test/p", headers={"Authorization": "Bearer " + key}),
                "placeholder_wrong_host": get("https://open.example.test/p", headers={"X-Key": key}),
                "host_spoof": get("https://open.example.test/p", headers={"Host": "api.example.test"}),
                "env_has_secret": any("REALSECRET" in v for v in os.environ.values()),
                "placeholder": key,
            }))
            """
        ),
    )
    assert code == 0, err
    r = json.loads(out)
    seen = [req["headers"] for req in world.upstream.seen.requests]
    assert (
        r["port_rule"][0] == 200
        and json.loads(r["port_rule"][2])["headers"]["X-Port-Rule"] == "[REDACTED]"
    )
    assert r["host_rule"][0] == 200
    assert r["wild"][0] == 200
    # the CONNECT completes so the refusal can be read; the request itself is a 403
    assert r["deny_default"][:2] == [403, "no-rule"]
    assert "evil.example.test: {}" in r["deny_default"][2]
    assert r["deny_default_curl"] == "200"
    assert r["deny_path"][:2] == [403, "path-denied: DELETE /admin/**"]
    assert r["placeholder_ok"][0] == 200
    assert r["placeholder_wrong_host"][:2] == [403, "placeholder-wrong-host: TEST_API_KEY"]
    assert r["host_spoof"][:2] == [403, "authority-mismatch"]
    assert r["env_has_secret"] is False
    assert r["placeholder"].startswith("sk-") and r["placeholder"] != REAL_KEY
    # exactly what reached the upstream: the allowed ones, each with the right credential
    assert len(seen) == 4
    assert seen[0].get("X-Port-Rule") == REAL_KEY and "Authorization" not in seen[0]
    assert seen[3]["Authorization"] == f"Bearer {REAL_KEY}"
    records = world.audit()
    assert len(records) == 9
    alerts = [x for x in records if x.get("alert")]
    assert len(alerts) == 1 and alerts[0]["host"] == "open.example.test"
    assert_no_secret(world, out, err)


async def test_sse_events_arrive_one_by_one(world: World) -> None:
    """The upstream sends each next event only once the agent has released it (after getting
    the previous one): a proxy that holds events back stalls the stream instead of passing."""
    code, out, err = await run(
        world,
        *py(
            """
            import json, requests
            r = requests.get("https://api.example.test/sse?n=5&gate=run", stream=True)
            events = []
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    events.append(line.decode())
                    requests.get("https://api.example.test/release?gate=run").raise_for_status()
            print(json.dumps(events))
            """
        ),
    )
    assert code == 0, err
    assert world.upstream.seen.stalled_gates == [], "an event was held back until the end"
    assert json.loads(out) == [f"data: event {i}" for i in range(5)]


@pytest.mark.slow
async def test_big_bodies_stream_with_bounded_memory(world: World) -> None:
    size = 200 * 1024 * 1024
    code, out, err = await run(
        world,
        *py(
            f"""
            import json, requests
            r = requests.get("https://api.example.test/big?size={size}", stream=True)
            down = sum(len(c) for c in r.iter_content(1 << 20))
            def gen():
                for _ in range({size} // (1 << 20)):
                    yield b"x" * (1 << 20)
            up = requests.post("https://api.example.test/upload", data=gen()).json()["received"]
            print(json.dumps([down, up]))
            """
        ),
        timeout=240,
    )
    assert code == 0, err
    assert json.loads(out) == [size, size]
    rec = next(r for r in world.audit() if r["path"].startswith("/big"))
    assert rec["bytes_down"] == size


async def test_raw_tcp_through_connect_is_killed(world: World) -> None:
    code, out, err = await run(
        world,
        *py(
            """
            import os, socket, urllib.parse
            proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
            s = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
            s.sendall(b"CONNECT open.example.test:443 HTTP/1.1\\r\\nHost: open.example.test:443\\r\\n\\r\\n")
            print(s.recv(4096).split(b"\\r\\n")[0].decode())
            s.sendall(b"SSH-2.0-OpenSSH_9.0\\r\\n" * 4)
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            print("closed" if not data else "got:" + data[:40].decode("latin-1"))
            """
        ),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("200 Connection established")
    assert lines[1] == "closed"
    assert world.upstream.seen.requests == []
    assert any(r["reason"] == "non-http-killed" for r in world.audit())


async def test_websocket_upgrade_gets_injection(world: World) -> None:
    code, out, err = await run(
        world,
        *py(
            """
            import asyncio, aiohttp, json, os
            async def main():
                async with aiohttp.ClientSession() as s:
                    proxy = os.environ["HTTPS_PROXY"]
                    async with s.ws_connect("wss://api.example.test/ws", proxy=proxy) as ws:
                        first = await ws.receive_str()
                        await ws.send_str("hello")
                        print(json.dumps([first, await ws.receive_str()]))
            asyncio.run(main())
            """
        ),
    )
    assert code == 0, err
    first, second = json.loads(out)
    assert json.loads(first)["authorization"] == "Bearer [REDACTED]"
    assert second == "echo:hello"
    assert world.upstream.seen.requests[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_http2_client_gets_the_upstreams_protocol(world: World) -> None:
    """The fake upstream speaks HTTP/1.1 only: the agent is offered what the upstream chose,
    so no request is translated across versions (HTTP/2 end to end: tests/conformance)."""
    code, out, err = await run(
        world,
        "curl",
        "-sS",
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "https://api.example.test/h2",
    )
    assert code == 0, err
    assert out.strip() == "1.1"


async def test_exit_code_and_missing_secret(world: World) -> None:
    code, _, _ = await run(world, sys.executable, "-c", "raise SystemExit(7)")
    assert code == 7
    env = world.env()
    del env["TEST_API_KEY"]
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv("true"), env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "secret 'key'" in err.decode() and "TEST_API_KEY" in err.decode()


PASSTHROUGH_AND_OAUTH = """version: 1
secrets:
  google:
    oauth:
      token_url: https://api.example.test/token
      grant: refresh_token
      client_id: {{ env: G_CLIENT_ID }}
      client_secret: {{ env: G_CLIENT_SECRET }}
      refresh_token: {{ env: G_REFRESH }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{google}}" }}
    open.example.test: {{ intercept: false }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "127.0.0.1:{port}"
    "open.example.test:443": "127.0.0.1:{port}"
audit:
  path: audit.jsonl
"""


@pytest.fixture
async def oauth_world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path, PASSTHROUGH_AND_OAUTH)
    yield w
    await w.upstream.close()


def oauth_env(world: World) -> dict[str, str]:
    env = world.env()
    env.update(
        G_CLIENT_ID="client-REALID-123456",
        G_CLIENT_SECRET="csecret-REAL-987654",
        G_REFRESH="1//refresh-REAL-token-abcdef",
    )
    return env


async def run_env(world: World, env: dict[str, str], *cmd: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(*cmd),
        env=env,
        cwd=world.dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_oauth_minted_once_for_concurrent_requests(oauth_world: World) -> None:
    code, out, err = await run_env(
        oauth_world,
        oauth_env(oauth_world),
        *py(
            """
            import json
            from concurrent.futures import ThreadPoolExecutor
            import requests
            def get(i):
                r = requests.get(f"https://api.example.test/v1/{i}", timeout=30)
                return r.status_code, r.json()["headers"]["Authorization"]
            with ThreadPoolExecutor(8) as pool:
                print(json.dumps(list(pool.map(get, range(16)))))
            """
        ),
    )
    assert code == 0, err
    results = json.loads(out)
    assert [s for s, _ in results] == [200] * 16
    assert {a for _, a in results} == {"Bearer [REDACTED]"}  # minted token scrubbed from echoes
    assert oauth_world.upstream.seen.token_requests == 1  # single-flight
    auths = {r["headers"].get("Authorization") for r in oauth_world.upstream.seen.requests}  # type: ignore[union-attr]
    assert auths == {"Bearer ya29.MINTED-0001-abcdefgh"}
    text = oauth_world.audit_path.read_text()
    assert "MINTED" not in text and "REAL" not in text and "MINTED" not in out + err


async def test_oauth_endpoint_down_fails_closed(oauth_world: World) -> None:
    oauth_world.upstream.seen.token_fail = True
    code, out, err = await run_env(
        oauth_world, oauth_env(oauth_world), "curl", "-sS", "-i", "https://api.example.test/v1/x"
    )
    assert code == 0, err
    assert " 502" in out.splitlines()[2] or "HTTP/2 502" in out
    assert "credentials-unavailable" in out
    assert oauth_world.upstream.seen.requests == []  # nothing sent without a fresh token
    rec = oauth_world.audit()[-1]
    assert rec["status"] == 502 and rec["reason"].startswith("credentials-unavailable")


async def test_hosts_needing_nothing_pass_through_untouched(oauth_world: World) -> None:
    """`intercept: false`: the agent sees the upstream's own certificate, not the gateway's."""
    code, out, err = await run_env(
        oauth_world,
        oauth_env(oauth_world),
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        str(oauth_world.ca.path),
        "https://open.example.test/p",
    )
    assert code == 0, err
    assert out == "200"
    rec = oauth_world.audit()[-1]
    assert rec["plane"] == "passthrough" and rec["host"] == "open.example.test"


async def test_client_abort_is_audited(world: World) -> None:
    code, _, err = await run(
        world,
        *py(
            f"""
            import pathlib, time, requests
            r = requests.get("https://api.example.test/sse?n=20&interval=0.2", stream=True)
            next(r.iter_lines())
            r.close()
            # stay until the gateway has audited it (the bound only catches a hang)
            audit, deadline = pathlib.Path({str(world.audit_path)!r}), time.monotonic() + 30
            while not (audit.exists() and '"/sse' in audit.read_text()):
                assert time.monotonic() < deadline, "the aborted request was never audited"
                time.sleep(0.05)
            """
        ),
    )
    assert code == 0, err
    recs = [r for r in world.audit() if str(r["path"]).startswith("/sse")]
    assert len(recs) == 1
    assert recs[0]["error"] is not None or recs[0]["status"] == 200


async def test_keep_alive_client_reuses_one_upstream_connection(world: World) -> None:
    """`upstream.resolve` redirects where the gateway dials; a keep-alive agent connection must
    still reuse its upstream connection instead of opening one per request."""
    world.upstream.seen.peers.clear()
    code, out, err = await run(
        world,
        *py(
            """
            import requests
            s = requests.Session()
            print([s.get("https://api.example.test/x", timeout=10).status_code
                   for _ in range(30)].count(200))
            """
        ),
        timeout=60,
    )
    assert code == 0, err
    assert out.strip() == "30"
    assert 1 <= len(world.upstream.seen.peers) <= 2, world.upstream.seen.peers


async def test_ca_key_on_disk_only_with_state(world: World) -> None:
    """Without --state the run's CA exists only in memory; --state keeps it there."""
    code, _, err = await run(world, "true")
    assert code == 0, err
    state = world.dir / "state"
    assert not (state / "ca").exists()
    keep = world.dir / "kept"
    proc = await asyncio.create_subprocess_exec(
        *KEYWARD, "run", "-c", str(world.config), "--state", str(keep), "--", "true",
        env=world.env(), cwd=world.dir, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert (keep / "ca" / "ca-key.pem").stat().st_mode & 0o077 == 0
