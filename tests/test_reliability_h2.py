"""HTTP/2 agents on the mitm plane get the bounds and answers HTTP/1.1 agents get: an idle
connection is closed `timeouts.request_headers` after its last response (not only before its
first request), and an upstream that refuses a request or never answers is keyward's own 502/504 with
`X-Keyward-Reason`, audited with that status and reason."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from gateway.runtime.reload import Reloader
from tests.support.embedded import Running, running, with_service
from tests.support.h2upstream import H2Upstream
from tests.support.wait import async_wait_until
from tests.support.world import REAL_KEY, World, make_world

H2_HOST = "h2.example.test"
QUICK = "timeouts: { connect: 2, tls: 2, response_headers: 1, idle: 1 }\n"


@dataclass
class H2World:
    world: World
    upstream: H2Upstream


@pytest.fixture
async def h2world(tmp_path: Path) -> AsyncIterator[H2World]:
    """The usual world plus an HTTP/2-only upstream, `h2.example.test`."""
    w = await make_world(tmp_path)
    up = await H2Upstream.start(w.ca.server_context(tmp_path / "pki", H2_HOST))
    text = w.config.read_text()
    text = text.replace(
        "    open.example.test: {}\n",
        f"    open.example.test: {{}}\n    {H2_HOST}: {{}}\n",
    )
    text = text.replace(
        "  resolve:\n",
        f'  resolve:\n    "{H2_HOST}:443": "127.0.0.1:{up.port}"\n',
    )
    w.config.write_text(text)
    yield H2World(w, up)
    await up.close()
    await w.upstream.close()


@dataclass
class H2Conn:
    """One HTTP/2 connection to `host` through the mitm plane (CONNECT, TLS with ALPN h2)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h2.connection.H2Connection
    ended: bool = False  # the gateway closed the connection (EOF or GOAWAY)
    events: list[h2.events.Event] = field(default_factory=list)

    async def _pump(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            self.ended = True
            return
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.ConnectionTerminated):
                self.ended = True
        self.writer.write(self.conn.data_to_send())

    async def get(self, path: str) -> int:
        """The status of a GET on a new stream of this connection."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "https"), (":authority", H2_HOST), (":path", path)],
            end_stream=True,
        )
        self.writer.write(self.conn.data_to_send())
        while not any(
            isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in self.events
        ):
            assert not self.ended, "the connection was closed during a request"
            await self._pump()
        [head] = [
            e
            for e in self.events
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
        ]
        return int(dict(head.headers)[":status"])

    async def until_closed(self) -> None:
        while not self.ended:
            await self._pump()


@asynccontextmanager
async def h2_connection(gw: Running, host: str = H2_HOST) -> AsyncIterator[H2Conn]:
    assert gw.gw.mitm is not None
    reader, writer = await asyncio.open_connection(*gw.gw.mitm.addresses[0])
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"200", head
    trust = ssl.create_default_context(cafile=str(gw.ctx.ca.cert_path))
    trust.set_alpn_protocols(["h2"])
    await writer.start_tls(trust, server_hostname=host)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    try:
        yield H2Conn(reader, writer, conn)
    finally:
        writer.close()


async def test_idle_h2_connection_is_closed_after_its_last_response(h2world: H2World) -> None:
    """Like an idle HTTP/1.1 keep-alive connection: closed quietly once `request_headers`
    passes with no stream live on it, however many requests it carried before; a stream that
    outlasts that bound (here a wait for response headers) is not cut by it."""
    world = h2world.world
    async with running(world) as gw, h2_connection(gw) as c:
        assert await c.get("/first") == 200  # under the default bound (60 s)
        # short bounds from now on: the request-headers bound is re-armed with 1 s once the next
        # stream is done, and that stream waits longer than that (5 s) for its 504
        world.config.write_text(
            world.config.read_text()
            + "timeouts: { request_headers: 1, connect: 1, tls: 1, response_headers: 3 }\n"
        )
        assert await Reloader(gw.ctx, environ={"TEST_API_KEY": REAL_KEY}).reload()
        assert await c.get("/hang") == 504
        closing = asyncio.ensure_future(c.until_closed())
        try:
            await async_wait_until(closing.done, what="the idle HTTP/2 connection closed")
        finally:
            closing.cancel()
        closing.result()
    seen = [s["pseudo"][":path"] for s in h2world.upstream.seen.streams]  # type: ignore[index]
    assert seen == ["/first", "/hang"]
    recs = [(r["path"], r["status"], r["reason"]) for r in world.audit()]
    assert recs == [("/first", 200, "rule"), ("/hang", 504, "upstream-timeout")], recs


async def test_h2_upstream_errors_are_keyward_answers(h2world: H2World) -> None:
    """A stream the upstream refuses (502 `upstream-error`) and one it never answers (504
    `upstream-timeout`): the status, header and JSON body an HTTP/1.1 agent gets, and the audit
    record says so. (An upstream already down when the agent connects is an HTTP/1.1 answer:
    the agent is offered the protocol the upstream chose, and there is none.)"""
    world = h2world.world
    with_service(world, QUICK)
    async with running(world) as gw:
        trust = ssl.create_default_context(cafile=str(gw.ctx.ca.cert_path))
        client = httpx.AsyncClient(proxy=gw.proxy, verify=trust, http2=True, timeout=60)
        async with client:
            down = await client.get(f"https://{H2_HOST}/reset")
            hung = await client.get(f"https://{H2_HOST}/hang")
    for r, status, reason in ((down, 502, "upstream-error"), (hung, 504, "upstream-timeout")):
        assert r.http_version == "HTTP/2"
        assert (r.status_code, r.headers.get("x-keyward-reason")) == (status, reason), r.headers
        assert r.headers["content-type"] == "application/json"
        assert json.loads(r.content) == {
            "error": "keyward could not complete the request",
            "reason": reason,
        }
        assert "mitmproxy" not in r.headers.get("server", "")
    recs = {r["path"]: (r["status"], r["reason"]) for r in world.audit()}
    assert recs == {"/reset": (502, "upstream-error"), "/hang": (504, "upstream-timeout")}
