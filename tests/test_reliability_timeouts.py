"""`timeouts:` on both planes, and mitm-plane upstream errors as keyward's own JSON answers:
an upstream that never answers, one that stalls mid-body, a slow-drip upload, one that is down."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.embedded import running, with_service
from tests.support.wait import BOUND
from tests.support.world import World, make_world

QUICK = "timeouts: { connect: 2, tls: 2, response_headers: 1, idle: 1 }\n"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    with_service(w, QUICK)
    yield w
    await w.upstream.close()


def by_path(world: World, path: str) -> dict[str, object]:
    [rec] = [r for r in world.audit() if r["path"] == path]
    return rec


async def test_upstream_that_never_answers_is_a_504_on_both_planes(world: World) -> None:
    async with running(world) as gw:
        for status, reason, body in (
            await gw.via_proxy("/hang?p=mitm"),
            await gw.via_service("/hang?p=svc"),
        ):
            assert status == 504 and reason == "upstream-timeout", (status, reason, body)
            assert json.loads(body)["reason"] == "upstream-timeout"
    for path in ("/hang?p=REDACTED", "/hang?p=REDACTED"):
        recs = [r for r in world.audit() if r["path"] == path]
        assert {(r["plane"], r["status"], r["reason"]) for r in recs} == {
            ("mitm", 504, "upstream-timeout"),
            ("service", 504, "upstream-timeout"),
        }


async def test_stalled_response_body_is_cut_and_audited(world: World) -> None:
    async with running(world) as gw:
        for url, proxy in (
            ("https://api.example.test/stall?p=mitm", gw.proxy),
            (gw.service_url("/stall?p=svc"), None),
        ):
            async with gw.client.get(url, proxy=proxy) as r:
                assert r.status == 200
                first = await r.content.readline()
                assert first == b"first chunk\n"
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        await asyncio.sleep(0)
    recs = [r for r in world.audit() if str(r["path"]).startswith("/stall")]
    assert sorted(r["plane"] for r in recs) == ["mitm", "service"]
    assert all(r["reason"] == "upstream-timeout" and r["status"] == 200 for r in recs), recs


async def test_slow_drip_upload_is_bounded(world: World) -> None:
    async def drip() -> AsyncIterator[bytes]:
        yield b"x" * 100
        await asyncio.sleep(30)
        yield b"never"

    async with running(world) as gw:
        for url, proxy in (
            ("https://api.example.test/upload?p=mitm", gw.proxy),
            (gw.service_url("/upload?p=svc"), None),
        ):
            status = None
            async with asyncio.timeout(20):  # the gateway must end it long before
                try:
                    async with gw.client.post(url, proxy=proxy, data=drip()) as r:
                        await r.read()
                        status = r.status
                except aiohttp.ClientError:
                    pass  # the connection was closed on us: also an end
            assert status is None or status >= 500
    recs = [r for r in world.audit() if str(r["path"]).startswith("/upload")]
    assert sorted(r["plane"] for r in recs) == ["mitm", "service"]
    assert all(r["reason"] in ("upstream-timeout", "client-idle-timeout") for r in recs), recs


async def test_mitm_upstream_errors_are_keyward_json_without_internal_addresses(
    world: World,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    text = world.config.read_text().replace(
        f'"open.example.test:443": "127.0.0.1:{world.upstream.port}"',
        f'"open.example.test:443": "127.0.0.1:{closed}"',
    )
    world.config.write_text(text)
    async with running(world) as gw:
        status, reason, body = await gw.via_proxy("/down", host="open.example.test")
    assert status == 502 and reason == "upstream-error", (status, reason, body)
    assert json.loads(body) == {"error": "keyward could not complete the request", "reason": reason}
    assert str(closed) not in body and "127.0.0.1" not in body and "<html" not in body
    rec = by_path(world, "/down")
    assert rec["status"] == 502 and rec["reason"] == "upstream-error"


async def test_transparent_route_honours_the_port_of_a_resolve_target(world: World) -> None:
    """A transparent connection is seen as the dialled IP; the rule and `upstream.resolve` are
    keyed by the verified name, and the resolve target's port must be the one dialled."""
    from mitmproxy.test import tflow

    from gateway.planes.mitm.addons import Destinations

    async with running(world) as gw:
        dest = Destinations(gw.ctx, None)
        flow = tflow.tflow()
        flow.request.host, flow.request.port = "127.0.0.1", 443  # what the agent dialled
        dest.route(flow, "api.example.test", 443)
        assert (flow.request.host, flow.request.port) == ("127.0.0.1", world.upstream.port)


async def test_an_upstream_that_never_finishes_tls_is_bounded_by_tls(world: World) -> None:
    """The upstream accepts TCP and never says a TLS word. mitm connects upstream before it
    answers the agent's handshake (to offer the agent the upstream's protocol), so nothing
    but `timeouts.tls` bounds that handshake: the agent is answered within it, not when its
    connection's request-headers bound (here an hour) runs out."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    text = world.config.read_text().replace(
        f'"open.example.test:443": "127.0.0.1:{world.upstream.port}"',
        f'"open.example.test:443": "127.0.0.1:{port}"',
    )
    world.config.write_text(text.replace("idle: 1 }", "idle: 1, request_headers: 3600 }"))
    try:
        async with running(world) as gw:
            status, reason, _ = await asyncio.wait_for(
                gw.via_proxy("/silent", host="open.example.test"), BOUND
            )
    finally:
        server.close()
        for w in held:
            w.close()
    assert held, "the gateway never dialled the silent upstream"
    assert (status, reason) == (504, "upstream-timeout"), (status, reason)
    rec = by_path(world, "/silent")
    assert (rec["status"], rec["reason"]) == (504, "upstream-timeout"), rec
