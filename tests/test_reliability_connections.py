"""`limits.max_connections` (total) and `limits.max_connections_per_client`: real connections are
held open, one more gets a 503 `connection-limit` JSON answer and is closed, on the mitm plane
(explicit proxy and transparent) and the service plane, and each is audited; a connection that
is released makes room again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from gateway.planes.mitm.master import start_mitm
from tests.support.embedded import Running, running, with_service
from tests.support.world import World, make_world

LIMITS = "limits: {{ max_connections: {total}, max_connections_per_client: {per_client} }}\n"
CONNECT = b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n"
GET = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


async def make(tmp_path: Path, total: int, per_client: int) -> World:
    w = await make_world(tmp_path)
    with_service(w, LIMITS.format(total=total, per_client=per_client))
    return w


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make(tmp_path, total=100, per_client=2)
    yield w
    await w.upstream.close()


class Held:
    """Connections opened from given loopback addresses and held, counted by the gateway."""

    def __init__(self, gw: Running) -> None:
        self.gw = gw
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, port: int, source: str = "127.0.0.1") -> asyncio.StreamWriter:
        expected = self.gw.ctx.connections.total + 1
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        self.writers.append(writer)
        for _ in range(3000):  # until the gateway has accepted (and counted) it
            if self.gw.ctx.connections.total >= expected:
                break
            await asyncio.sleep(0.01)
        assert self.gw.ctx.connections.total == expected
        return writer

    async def close(self, writer: asyncio.StreamWriter) -> None:
        expected = self.gw.ctx.connections.total - 1
        writer.close()
        self.writers.remove(writer)
        for _ in range(3000):
            if self.gw.ctx.connections.total <= expected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the gateway never released a closed connection")

    async def aclose(self) -> None:
        for w in self.writers:
            w.close()


async def exchange(
    port: int, request: bytes, source: str = "127.0.0.1", *, tunnel: bool = False
) -> tuple[bytes, bool]:
    """(the answer, whether the gateway closed the connection after it; a `tunnel` that is
    established stays open: only its head is read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(request)
        await writer.drain()
        if tunnel:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60), False
        answer = await asyncio.wait_for(reader.read(), 60)  # until the gateway closes
        return answer, True
    finally:
        writer.close()


def body_of(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        out, body = out + body[:n], body[n + 2 :]
        if n == 0:
            break
    return out


def refused_answer(answer: bytes) -> dict[str, object]:
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"x-keyward-reason: connection-limit" in answer.lower(), answer
    parsed: dict[str, object] = json.loads(body_of(answer))
    assert parsed["reason"] == "connection-limit"
    return parsed


def service_port(gw: Running) -> int:
    return gw.gw.service_ports["api"]


def proxy_port(gw: Running) -> int:
    return gw.gw.mitm.addresses[0][1] if gw.gw.mitm else 0


async def test_per_client_limit_on_both_planes(world: World) -> None:
    async with running(world) as gw, AsyncExitStack() as stack:
        held = Held(gw)
        stack.push_async_callback(held.aclose)
        await held.open(proxy_port(gw))
        one = await held.open(service_port(gw))  # the limit counts both planes together

        answer, closed = await exchange(proxy_port(gw), CONNECT)
        assert "max_connections_per_client" in str(refused_answer(answer)["detail"])
        assert closed
        answer, closed = await exchange(service_port(gw), GET)
        refused_answer(answer)
        assert closed

        # another client address is not held back by this one's connections
        answer, _ = await exchange(proxy_port(gw), CONNECT, source="127.0.0.2", tunnel=True)
        assert answer.startswith(b"HTTP/1.1 200"), answer

        await held.close(one)  # room again for 127.0.0.1
        status, _, body = await gw.via_service("/v1/models")
        assert status == 200, body
    recs = [r for r in world.audit() if r["reason"] == "connection-limit"]
    assert {(r["plane"], r["status"], r["decision"]) for r in recs} == {
        ("mitm", 503, "deny"),
        ("service", 503, "deny"),
    }
    assert len(recs) == 2 and all(str(r["client"]).startswith("127.0.0.1:") for r in recs)


async def test_total_limit_counts_every_client(tmp_path: Path) -> None:
    world = await make(tmp_path, total=2, per_client=100)
    try:
        async with running(world) as gw, AsyncExitStack() as stack:
            held = Held(gw)
            stack.push_async_callback(held.aclose)
            await held.open(proxy_port(gw), source="127.0.0.1")
            await held.open(service_port(gw), source="127.0.0.2")
            for port, request in ((proxy_port(gw), CONNECT), (service_port(gw), GET)):
                answer, closed = await exchange(port, request, source="127.0.0.3")
                assert "limits.max_connections (2)" in str(refused_answer(answer)["detail"])
                assert closed
    finally:
        await world.upstream.close()
    recs = [r for r in world.audit() if r["reason"] == "connection-limit"]
    assert len(recs) == 2 and all(str(r["client"]).startswith("127.0.0.3:") for r in recs)


async def test_transparent_listener_answers_over_the_limit(world: World) -> None:
    """A transparent connection over the limit: its first request gets the 503 (nothing is
    dialled for it), like an explicit one."""
    async with running(world) as gw, AsyncExitStack() as stack:
        plane = await start_mitm(gw.ctx, ["transparent@127.0.0.1:0"])
        stack.push_async_callback(plane.close)
        port = plane.addresses[0][1]
        held = Held(gw)
        stack.push_async_callback(held.aclose)
        await held.open(port)
        await held.open(port)
        answer, closed = await exchange(port, b"GET / HTTP/1.1\r\nHost: open.example.test\r\n\r\n")
        refused_answer(answer)
        assert closed
    [rec] = [r for r in world.audit() if r["reason"] == "connection-limit"]
    assert rec["plane"] == "mitm" and rec["status"] == 503
