"""The aiohttp plane against real servers: real TLS to fake upstreams, real clients, one process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.config.loader import load_config
from gateway.config.model import TimeoutsConfig
from gateway.credentials.oauth import TokenMinter
from gateway.errors import AddressRefused
from gateway.planes.context import GatewayContext
from gateway.planes.http.proxy import HttpPlane
from gateway.runtime.assemble import build_context
from gateway.upstream.connector import DialResolver
from tests.support.pki import TestCA, make_ca
from tests.support.upstream import GATE_BOUND, Upstream
from tests.support.wait import async_wait_until

REAL_KEY = "sk-live-REALKEY-5f2b9c1e7a3d4b6f8e0a1c2d"
MB = 1 << 20

CONFIG = """version: 1
secrets:
  key: {{ env: KW_TEST_KEY }}
  tok:
    oauth:
      token_url: https://down.example.test/token
      grant: client_credentials
      client_id: {{ env: KW_CLIENT_ID }}
      client_secret: {{ env: KW_CLIENT_SECRET }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /v1/admin/**", "* /v1/forbidden/**"]
    badtls.example.test: {{}}
    down.example.test: {{}}
    oauth.example.test:
      headers: {{ Authorization: "Bearer {{tok}}" }}
    plain.example.test: {{}}
    dns.example.test: {{ private_addresses: allow }}  # its DNS answer is the fake's 127.0.0.1
services:
  api: {{ listen: 0, upstream: "https://api.example.test" }}
  badtls: {{ listen: 0, upstream: "https://badtls.example.test" }}
  down: {{ listen: 0, upstream: "https://down.example.test" }}
  oauth: {{ listen: 0, upstream: "https://oauth.example.test" }}
upstream:
  ca_bundle: "{ca}"
  resolve:
    "api.example.test:443": "127.0.0.1:{port}"
    "oauth.example.test:443": "127.0.0.1:{port}"
    "badtls.example.test:443": "127.0.0.1:{bad_port}"
    "down.example.test:443": "127.0.0.1:{down_port}"
    "plain.example.test:{plain_port}": "127.0.0.1:{plain_port}"
audit:
  path: audit.jsonl
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the gateway under test -----------------------------------------------------------------
@dataclass
class Env:
    dir: Path
    ca: TestCA
    up: Upstream
    bad: Upstream
    plain: Upstream
    ctx: GatewayContext
    plane: HttpPlane
    ports: dict[str, int]
    client: aiohttp.ClientSession

    def url(self, path: str, service: str = "api") -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def audit(self) -> list[dict[str, object]]:
        path = self.dir / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def audit_text(self) -> str:
        path = self.dir / "audit.jsonl"
        return path.read_text() if path.exists() else ""

    async def wait_audit(self, n: int) -> list[dict[str, object]]:
        await async_wait_until(lambda: len(self.audit()) >= n, what=f"{n} audit record(s)")
        return self.audit()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    ca = make_ca(tmp_path / "pki")
    up = await Upstream.start(ca.server_context(tmp_path / "pki", "api.example.test"))
    rogue = make_ca(tmp_path / "rogue", name="not trusted by anyone")
    bad = await Upstream.start(rogue.server_context(tmp_path / "rogue", "badtls.example.test"))
    plain = await Upstream.start(None)
    cfg = tmp_path / "keyward.yaml"
    cfg.write_text(
        CONFIG.format(
            ca=ca.path,
            port=up.port,
            bad_port=bad.port,
            down_port=closed_port(),
            plain_port=plain.port,
        )
    )
    environ = {
        "KW_TEST_KEY": REAL_KEY,
        "KW_CLIENT_ID": "client-id-1",
        "KW_CLIENT_SECRET": "cs-9x8y7z6w5v",
    }
    ctx = build_context(load_config(cfg), tmp_path / "state", environ=environ)
    minter = TokenMinter(
        ctx.secrets, ctx.state_dir, ctx.upstream_ssl_context(), dial=ctx.dial_addresses
    )
    ctx.prepare_tokens = minter.ensure
    plane = HttpPlane(ctx)
    ports = await plane.start()
    client = aiohttp.ClientSession()
    e = Env(tmp_path, ca, up, bad, plain, ctx, plane, ports, client)
    yield e
    await client.close()
    await plane.close()
    await minter.close()
    for u in (up, bad, plain):
        await u.close()
    ctx.audit.close()


def assert_one_record_each(env: Env, n: int) -> list[dict[str, object]]:
    records = env.audit()
    assert len(records) == n, records
    assert REAL_KEY not in env.audit_text()
    return records


# -- tests ------------------------------------------------------------------------------------
async def test_injects_real_key_and_replaces_agent_auth(env: Env) -> None:
    async with env.client.get(
        env.url("/v1/models?limit=2"), headers={"Authorization": "Bearer agent-made-up"}
    ) as r:
        assert r.status == 200
        text = await r.text()
        echo_auth = r.headers["X-Echo-Auth"]
    seen = env.up.seen.requests[-1]
    assert seen["path"] == "/v1/models?limit=2"
    assert seen["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    assert seen["headers"]["Host"] == "api.example.test"  # type: ignore[index]
    # a compressed echo could not be scrubbed: requests carrying a secret ask for identity
    assert seen["headers"]["Accept-Encoding"] == "identity"  # type: ignore[index]
    # the upstream echoed the key back: the agent sees it scrubbed, in body and header
    assert REAL_KEY not in text and REAL_KEY not in echo_auth
    assert "[REDACTED]" in echo_auth
    assert "agent-made-up" not in text
    [rec] = assert_one_record_each(env, 1)
    assert rec["plane"] == "service" and rec["decision"] == "allow" and rec["status"] == 200
    assert rec["host"] == "api.example.test" and rec["port"] == 443
    assert rec["injected"] == [{"secret": "key", "location": "header:Authorization"}]
    assert rec["bytes_down"] == len(text.encode())


async def test_deny_by_method_and_path_never_contacts_upstream(env: Env) -> None:
    cases = [
        ("DELETE", "/v1/admin/users/7", "path-denied: DELETE /v1/admin/**"),
        ("DELETE", "/v1/x/../admin/users", "path-denied: DELETE /v1/admin/**"),
        ("GET", "/v1/forbidden/thing", "path-denied: * /v1/forbidden/**"),
    ]
    for method, path, reason in cases:
        accept = {"Accept": "application/json"}
        async with env.client.request(method, env.url(path), headers=accept) as r:
            assert r.status == 403
            assert r.headers["X-Keyward-Reason"] == reason
            body = await r.json()
        assert body["error"] == "denied by keyward"
        assert (body["reason"], body["rule"]) == (reason, "api.example.test")
        assert body["refused"]["method"] == method and body["refused"]["port"] == 443
    assert env.up.seen.requests == [] and env.up.seen.peers == set()
    records = assert_one_record_each(env, len(cases))
    assert all(r["decision"] == "deny" and r["status"] == 403 for r in records)
    assert all(r["injected"] == [] for r in records)
    # DELETE elsewhere is fine
    async with env.client.delete(env.url("/v1/files/1")) as r:
        assert r.status == 200


async def test_upstream_connections_are_pooled(env: Env) -> None:
    for i in range(200):
        async with env.client.get(env.url(f"/v1/items/{i}")) as r:
            assert r.status == 200
            await r.read()
    assert len(env.up.seen.requests) == 200
    assert 1 <= len(env.up.seen.peers) <= 2, env.up.seen.peers
    assert_one_record_each(env, 200)


async def test_sse_flows_event_by_event(env: Env) -> None:
    """The upstream sends each next event only after the client got the previous one, so a
    proxy that holds events back (buffering, or waiting for the next one to push it out)
    stalls the stream instead of passing."""
    events = []
    async with env.client.get(env.url("/v1/sse?n=5&gate=sse")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        async for line in r.content:
            if line.startswith(b"data: event "):
                events.append(line.strip())
                env.up.seen.release("sse")
    assert env.up.seen.stalled_gates == [], "an event was held back until the stream ended"
    assert events == [f"data: event {i}".encode() for i in range(5)]
    [rec] = assert_one_record_each(env, 1)
    assert rec["status"] == 200 and rec["bytes_down"] == sum(
        len(f"data: event {i}\n\n") for i in range(5)
    )


async def test_chunked_upload_is_streamed(env: Env) -> None:
    """The rest of the body is sent only once the upstream has the first chunk: a proxy that
    reads the whole body before forwarding it never lets that happen."""
    held_back: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        try:
            await asyncio.wait_for(env.up.seen.upload_started.wait(), GATE_BOUND)
        except TimeoutError:
            held_back.append(True)
        for part in (b"b" * 1000, b"c" * 1000):
            yield part

    async with env.client.post(env.url("/v1/upload"), data=body()) as r:
        assert r.status == 200
        assert await r.json() == {"received": 3000}
    assert held_back == [], "the upstream saw nothing of the body before it was complete"
    [rec] = assert_one_record_each(env, 1)
    assert rec["bytes_up"] == 3000


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/self/status")


@pytest.mark.slow
async def test_200mb_each_way_with_bounded_memory(env: Env) -> None:
    size = 200 * MB
    with contextlib.suppress(OSError):  # reset the peak-RSS mark: measure this test only
        Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")

    async def body() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            yield chunk

    t0 = time.monotonic()
    async with env.client.post(env.url("/v1/upload"), data=body()) as r:
        assert r.status == 200
        assert await r.json() == {"received": size}
    t_up = time.monotonic() - t0
    t0 = time.monotonic()
    got = 0
    async with env.client.get(env.url(f"/v1/big?size={size}")) as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            got += len(chunk)
    t_down = time.monotonic() - t0
    assert got == size
    growth_mb = (_rss_kb("VmHWM") - before) / 1024
    print(
        f"\n200 MB up {size / MB / t_up:.0f} MB/s, down {size / MB / t_down:.0f} MB/s, "
        f"peak RSS growth {growth_mb:.1f} MB"
    )
    assert growth_mb < 100
    records = assert_one_record_each(env, 2)
    assert records[0]["bytes_up"] == size and records[1]["bytes_down"] == size


async def test_echoed_key_scrubbed_across_chunk_boundaries(env: Env) -> None:
    async with env.client.get(env.url("/v1/split")) as r:
        assert r.status == 200
        pieces = [chunk async for chunk in r.content.iter_any()]
    text = b"".join(pieces).decode()
    # the upstream did get (and echo) the real key
    assert env.up.seen.requests[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    assert REAL_KEY not in text
    assert text == "data: Bearer [REDACTED]\n"
    # and a body echo with the key inside JSON
    async with env.client.post(env.url("/v1/echo"), data=f"my key is {REAL_KEY}!") as r:
        text = await r.text()
    assert REAL_KEY not in text and "[REDACTED]" in text
    assert_one_record_each(env, 2)


async def test_small_bodies_get_their_scrubbed_length_large_ones_stream(env: Env) -> None:
    """A small sized response is scrubbed whole and re-framed with its new length; a large
    one is streamed (chunked), never held in memory."""
    async with env.client.post(env.url("/v1/echo"), data=f"key {REAL_KEY} and more") as r:
        body = await r.read()
        assert r.headers.get("Transfer-Encoding") is None
        assert int(r.headers["Content-Length"]) == len(body)
    assert REAL_KEY.encode() not in body and b"[REDACTED]" in body
    size = 200_000  # above the small-body limit
    async with env.client.get(env.url(f"/v1/big?size={size}")) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.headers
        assert len(await r.read()) == size
    recs = assert_one_record_each(env, 2)
    assert recs[0]["bytes_down"] == len(body) and recs[1]["bytes_down"] == size


async def _raw_request(port: int, head: str) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


async def test_hop_by_hop_headers_stripped_both_ways(env: Env) -> None:
    head = (
        "GET /v1/echo HTTP/1.1\n"
        "Host: 127.0.0.1\n"
        "Connection: close, X-Hop-Req\n"
        "X-Hop-Req: secret-ish\n"
        "Keep-Alive: 300\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\n"
        "Proxy-Connection: keep-alive\n"
        "TE: trailers\n"
        "X-End-To-End: kept\n"
    )
    status, _, _ = await _raw_request(env.ports["api"], head)
    assert " 200 " in status
    seen = {k.lower(): v for k, v in env.up.seen.requests[-1]["headers"].items()}  # type: ignore[union-attr]
    for name in ("x-hop-req", "keep-alive", "proxy-authorization", "proxy-connection", "te"):
        assert name not in seen, name
    assert seen["x-end-to-end"] == "kept"
    assert not any(k.startswith("x-forwarded") or k in ("via", "forwarded") for k in seen)
    assert "user-agent" not in seen  # nothing added on our behalf

    status, headers, _ = await _raw_request(
        env.ports["api"], "GET /v1/hop HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n"
    )
    assert " 200 " in status
    assert headers["x-kept"] == "yes"
    for name in ("x-hop-resp", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert name not in headers, name
    assert not any(k.startswith("x-forwarded") or k == "via" for k in headers)
    assert_one_record_each(env, 2)


async def test_head_and_bodiless_responses_keep_the_connection_usable(env: Env) -> None:
    async with env.client.head(env.url("/v1/big?size=1000")) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "1000"
        assert await r.read() == b""
    async with env.client.post(env.url("/v1/empty"), data=b"x" * 10) as r:
        assert r.status == 204 and r.headers["X-Empty"] == "1"
        assert await r.read() == b""
    for _ in range(3):  # the agent's and the upstream's keep-alive connections are still in sync
        async with env.client.get(env.url("/v1/echo")) as r:
            assert r.status == 200
            assert (await r.json())["method"] == "GET"
    assert len(env.up.seen.peers) == 1
    records = assert_one_record_each(env, 5)
    assert [r["status"] for r in records] == [200, 204, 200, 200, 200]


async def test_upstream_tls_failure_is_502(env: Env) -> None:
    async with env.client.get(env.url("/v1/x", "badtls")) as r:
        assert r.status == 502
        assert r.headers["X-Keyward-Reason"] == "upstream-tls-error"
        assert (await r.json())["reason"] == "upstream-tls-error"
    assert env.bad.seen.requests == []  # the handshake failed: no request was ever sent
    [rec] = assert_one_record_each(env, 1)
    assert rec["status"] == 502 and rec["reason"] == "upstream-tls-error"
    assert "certificate" in str(rec["error"]).lower()


async def test_upstream_down_is_502(env: Env) -> None:
    async with env.client.get(env.url("/v1/x", "down")) as r:
        assert r.status == 502
        assert r.headers["X-Keyward-Reason"] == "upstream-connect-error"
    [rec] = assert_one_record_each(env, 1)
    assert rec["status"] == 502 and rec["reason"] == "upstream-connect-error"


async def test_upstream_response_header_timeout_is_504(env: Env) -> None:
    cfg = env.ctx.config.config
    # the wait for response headers is bounded by connect + tls + response_headers (7 s here):
    # /v1/hang answers after 60 s, so a 504 means the bound fired, and connect and TLS on a
    # loaded machine have room to finish within theirs
    quick = cfg.model_copy(
        update={"timeouts": TimeoutsConfig(connect=3, tls=3, response_headers=1)}
    )
    env.ctx.config = dataclasses.replace(env.ctx.config, config=quick)
    impatient = HttpPlane(env.ctx)
    try:
        port = await impatient.serve(
            impatient.make_service_app("api", env.ctx.config.config.services["api"])
        )
        async with env.client.get(f"http://127.0.0.1:{port}/v1/hang") as r:
            assert r.status == 504
            assert r.headers["X-Keyward-Reason"] == "upstream-timeout"
        assert [q["path"] for q in env.up.seen.requests] == ["/v1/hang"]  # it got there
    finally:
        await impatient.close()
    [rec] = assert_one_record_each(env, 1)
    assert rec["reason"] == "upstream-timeout" and rec["status"] == 504


async def test_oauth_token_unavailable_is_502_and_upstream_untouched(env: Env) -> None:
    async with env.client.get(env.url("/v1/x", "oauth")) as r:
        assert r.status == 502
        assert r.headers["X-Keyward-Reason"] == "credentials-unavailable: TokenUnavailable"
    assert env.up.seen.requests == []
    [rec] = assert_one_record_each(env, 1)
    assert rec["status"] == 502 and "token endpoint" in str(rec["error"])


async def test_client_abort_is_audited_once(env: Env) -> None:
    async with env.client.get(env.url("/v1/sse")) as r:
        first = await r.content.readline()
        assert first.startswith(b"data: event 0")
        r.connection.transport.close()  # type: ignore[union-attr]  # the agent hangs up
    records = await env.wait_audit(1)
    await asyncio.sleep(0.6)  # would a second record appear when the upstream finishes?
    records = assert_one_record_each(env, 1)
    assert records[0]["reason"] == "client-aborted"
    assert records[0]["error"] == "client disconnected"


async def test_override_resolver_keeps_the_name(env: Env) -> None:
    resolver = DialResolver(env.ctx.dial_addresses)
    try:
        [hit] = await resolver.resolve("API.example.test.", 443)
        assert (hit["hostname"], hit["host"], hit["port"]) == (
            "API.example.test.",
            "127.0.0.1",
            env.up.port,
        )
        with pytest.raises(AddressRefused):  # no rule names localhost:80: loopback refused
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


@pytest.mark.slow
async def test_measure_latency_and_throughput(env: Env) -> None:
    """Printed for the notes, not asserted: direct HTTPS vs through the service."""
    direct = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            ssl=env.ctx.upstream_ssl_context(), resolver=DialResolver(env.ctx.dial_addresses)
        )
    )
    n = 300

    async def sequential(session: aiohttp.ClientSession, url: str) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
        return times

    async def concurrent(session: aiohttp.ClientSession, url: str, workers: int = 32) -> float:
        t0 = time.perf_counter()

        async def worker() -> None:
            for _ in range(n // workers):
                async with session.get(url) as r:
                    await r.read()

        await asyncio.gather(*(worker() for _ in range(workers)))
        return (n // workers) * workers / (time.perf_counter() - t0)

    try:
        d = await sequential(direct, "https://api.example.test/v1/ping")
        g = await sequential(env.client, env.url("/v1/ping"))
        d_rps = await concurrent(direct, "https://api.example.test/v1/ping")
        g_rps = await concurrent(env.client, env.url("/v1/ping"))
    finally:
        await direct.close()
    dm, gm = statistics.median(d) * 1000, statistics.median(g) * 1000
    print(
        f"\nsequential median: direct {dm:.2f} ms, via service {gm:.2f} ms "
        f"(added {gm - dm:.2f} ms); rps sequential direct {1 / statistics.mean(d):.0f}, "
        f"via {1 / statistics.mean(g):.0f}; 32 concurrent: direct {d_rps:.0f} rps, "
        f"via {g_rps:.0f} rps"
    )
    assert len(env.audit()) == n + (n // 32) * 32  # one record per gateway request
