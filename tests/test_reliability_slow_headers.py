"""`timeouts.request_headers`: a client dripping its request headers one byte at a time (which
resets any inactivity timer) is cut off on both planes, and audited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.embedded import running, with_service
from tests.support.world import World, make_world

QUICK = "timeouts: { request_headers: 1 }\n"
DRIP = b"GET /v1/models HTTP/1.1\r\nHost: open.example.test\r\nX-Drip: " + b"a" * 4000


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    with_service(w, QUICK)
    yield w
    await w.upstream.close()


async def drip_until_closed(port: int, data: bytes = DRIP) -> bool:
    """Send `data` a byte at a time; True if the gateway closed the connection before the
    last byte (the drip would take minutes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed = asyncio.ensure_future(reader.read())  # the answer, if any, then EOF
    try:
        for byte in data:
            if closed.done():
                return True
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return True
            await asyncio.sleep(0.05)
        return closed.done()
    finally:
        closed.cancel()
        with contextlib.suppress(BaseException):
            await closed
        writer.close()


async def test_slow_drip_headers_are_cut_off_on_both_planes(world: World) -> None:
    async with running(world) as gw:
        assert gw.gw.mitm is not None
        assert await drip_until_closed(gw.gw.mitm.addresses[0][1])
        assert await drip_until_closed(gw.gw.service_ports["api"])
        # a client that sends its request in time is served as before
        status, _, body = await gw.via_service("/v1/models")
        assert status == 200, body
    recs = [r for r in world.audit() if r["reason"] == "client-headers-timeout"]
    assert sorted(str(r["plane"]) for r in recs) == ["mitm", "service"]
    assert all("timeouts.request_headers" in str(r["error"]) for r in recs)
