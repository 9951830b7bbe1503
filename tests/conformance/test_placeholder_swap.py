"""Placeholder swap locations: a hostile agent tries to make the real key part of content the
provider stores (a WebSocket message, a query string, a body) by sending its placeholder there.
With the default `swap_in: [header, basic]` the placeholder reaches the upstream unchanged and the
request is audited as an alert; a placeholder whose `swap_in` lists a location is swapped there.
Both planes (mitm through the proxy, the service listener), explicit mode under `keyward run`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import textwrap

import pytest

from tests.support.world import CONFIG, REAL_KEY, World, make_world

SWAP_CONFIG = CONFIG.replace(
    "placeholders:\n  TEST_API_KEY: {{ secret: key }}\n",
    "placeholders:\n  TEST_API_KEY: {{ secret: key }}\n"
    "  OPEN_API_KEY: {{ secret: key, swap_in: [header, query, body, websocket] }}\n"
    'services:\n  api: {{ listen: 0, upstream: "https://api.example.test" }}\n',
)

AGENT = """
import asyncio, base64, json, os, aiohttp
key, open_key = os.environ["TEST_API_KEY"], os.environ["OPEN_API_KEY"]
proxy = os.environ["HTTPS_PROXY"]
service = os.environ["KEYWARD_SERVICE_API_URL"]

async def main():
    out = {}
    async with aiohttp.ClientSession() as s:
        for name, k in (("default", key), ("open", open_key)):
            async with s.ws_connect("wss://api.example.test/ws", proxy=proxy) as ws:
                await ws.receive_str()
                await ws.send_str("note " + k)
                out[f"ws-{name}"] = await ws.receive_str()
            for plane, base, kw in (("mitm", "https://api.example.test", {"proxy": proxy}),
                                    ("service", service, {})):
                async with s.get(f"{base}/q-{name}?k={k}", **kw) as r:
                    out[f"query-{plane}-{name}"] = r.status
                async with s.post(f"{base}/b-{name}", data=("body " + k).encode(), **kw) as r:
                    out[f"body-{plane}-{name}"] = [r.status, (await r.json())["body"]]
        blob = base64.b64encode(f"user:{key}".encode()).decode()
        async with s.get("https://a.wild.example.test/basic", proxy=proxy,
                         headers={"Authorization": "Basic " + blob}) as r:
            out["basic"] = r.status
    out["keys"] = [key, open_key]
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def swapped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    async def go() -> dict[str, object]:
        world = await make_world(tmp_path_factory.mktemp("swap"), SWAP_CONFIG)
        try:
            return await attack(world)
        finally:
            await world.upstream.close()

    return asyncio.run(go())


async def attack(world: World) -> dict[str, object]:
    env = world.env()
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(sys.executable, "-c", textwrap.dedent(AGENT)),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=world.dir,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    seen = world.upstream.seen.requests
    return {
        "agent": result,
        "seen": seen,
        "audit": world.audit(),
        "ws": list(world.upstream.seen.ws_messages),
    }


def seen_path(result: dict[str, object], prefix: str) -> list[str]:
    return [str(r["path"]) for r in result["seen"] if str(r["path"]).startswith(prefix)]  # type: ignore[attr-defined,index]


def test_default_placeholder_is_not_swapped_into_a_websocket_message(
    swapped: dict[str, object],
) -> None:
    key = swapped["agent"]["keys"][0]  # type: ignore[index]
    assert swapped["ws"][0] == f"note {key}"  # type: ignore[index]  # what the upstream got
    ws = [r for r in swapped["audit"] if r["path"] == "/ws"]  # type: ignore[attr-defined]
    assert ws[0]["alert"] is True


def test_default_placeholder_is_not_swapped_into_a_query(swapped: dict[str, object]) -> None:
    key = swapped["agent"]["keys"][0]  # type: ignore[index]
    for path in seen_path(swapped, "/q-default"):
        assert path.endswith(f"k={key}") and REAL_KEY not in path
    assert len(seen_path(swapped, "/q-default")) == 2  # both planes
    records = [r for r in swapped["audit"] if str(r["path"]).startswith("/q-default")]  # type: ignore[attr-defined]
    assert len(records) == 2 and all(r["alert"] for r in records)


def test_default_placeholder_in_a_body_is_an_alert(swapped: dict[str, object]) -> None:
    key = swapped["agent"]["keys"][0]  # type: ignore[index]
    got = [r["body"] for r in swapped["seen"] if str(r["path"]).startswith("/b-default")]  # type: ignore[attr-defined,index]
    assert got == [f"body {key}"] * 2  # both planes: unchanged
    records = [r for r in swapped["audit"] if str(r["path"]).startswith("/b-default")]  # type: ignore[attr-defined]
    assert len(records) == 2 and all(r["alert"] and r["status"] == 200 for r in records)


def test_opted_in_locations_are_swapped(swapped: dict[str, object]) -> None:
    assert swapped["ws"][1] == f"note {REAL_KEY}"  # type: ignore[index]
    for path in seen_path(swapped, "/q-open"):
        assert path.endswith(f"k={REAL_KEY}")
    got = [r["body"] for r in swapped["seen"] if str(r["path"]).startswith("/b-open")]  # type: ignore[attr-defined,index]
    assert got == [f"body {REAL_KEY}"] * 2
    agent = swapped["agent"]
    for plane in ("mitm", "service"):  # the echo back to the agent is scrubbed
        assert agent[f"body-{plane}-open"] == [200, "body [REDACTED]"]  # type: ignore[index]
    records = [r for r in swapped["audit"] if str(r["path"]).startswith(("/q-open", "/b-open"))]  # type: ignore[attr-defined]
    assert len(records) == 4 and not any(r["alert"] for r in records)


def test_basic_blob_placeholder_is_swapped(swapped: dict[str, object]) -> None:
    hit = [r for r in swapped["seen"] if r["path"] == "/basic"]  # type: ignore[attr-defined]
    assert hit, swapped["agent"]
    blob = hit[-1]["headers"]["Authorization"].split(" ", 1)[1]
    assert base64.b64decode(blob).decode() == f"user:{REAL_KEY}"


def test_no_secret_in_the_audit(swapped: dict[str, object]) -> None:
    assert REAL_KEY not in json.dumps(swapped["audit"])
