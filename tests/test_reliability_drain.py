"""SIGTERM drains `keyward serve`: listeners close, live requests and streams on both planes
finish within --drain, what is left after it is cut and audited."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.wait import BOUND
from tests.support.world import World, make_world

ROOT = Path(__file__).resolve().parent.parent
KEYWARD = [sys.executable, "-m", "gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    await w.upstream.close()


async def serve(world: World, drain: float) -> tuple[asyncio.subprocess.Process, int, int]:
    svc = free_port()
    text = world.config.read_text()
    text += f'services:\n  api: {{ listen: {svc}, upstream: "https://api.example.test" }}\n'
    world.config.write_text(text)
    explicit = free_port()
    ready = world.dir / "ready"
    proc = await asyncio.create_subprocess_exec(
        *KEYWARD, "serve", "-c", str(world.config), "--no-netfilter",
        "--proxy-uid", str(os.getuid()), "--state", str(world.dir / "state"),
        "--ready-file", str(ready), "--control-socket", str(world.dir / "control.sock"),
        "--transparent-port", str(free_port()), "--explicit-port", str(explicit),
        "--dns-port", str(free_port()), "--drain", str(drain),
        env={**world.env(), "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    for _ in range(600):
        if ready.exists() or proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert ready.exists(), "serve did not get ready"
    return proc, explicit, svc


def client(world: World) -> aiohttp.ClientSession:
    trust = ssl.create_default_context(cafile=str(world.dir / "state" / "ca" / "ca-cert.pem"))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust, force_close=True))


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_lets_streams_on_both_planes_finish(world: World) -> None:
    proc, explicit, svc = await serve(world, drain=30)
    seen = world.upstream.seen
    try:
        async with client(world) as c:
            mitm = await c.get(
                "https://api.example.test/sse?gate=mitm", proxy=f"http://127.0.0.1:{explicit}"
            )
            service = await c.get(f"http://127.0.0.1:{svc}/sse?gate=svc")
            assert mitm.status == 200 and service.status == 200
            # each upstream holds its next event until released: both streams are mid-flight
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(BOUND):  # the drain has begun: listeners are closed
                while not (await refused(explicit) and await refused(svc)):
                    await asyncio.sleep(0.05)
            for gate in ("mitm", "svc"):
                for _ in range(4):
                    seen.release(gate)
            bodies = [await mitm.read(), await service.read()]
        assert seen.stalled_gates == []
        for body in bodies:
            assert body.count(b"data: event ") == 5, body
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    recs = [r for r in world.audit() if str(r["path"]).startswith("/sse")]
    assert sorted(r["plane"] for r in recs) == ["mitm", "service"]
    assert all(r["status"] == 200 and r["bytes_down"] > 0 and not r["error"] for r in recs)


async def test_streams_past_the_drain_bound_are_cut_and_audited(world: World) -> None:
    proc, explicit, svc = await serve(world, drain=1)
    try:
        async with client(world) as c:
            mitm = await c.get(
                "https://api.example.test/stall", proxy=f"http://127.0.0.1:{explicit}"
            )
            service = await c.get(f"http://127.0.0.1:{svc}/stall")
            for r in (mitm, service):
                assert await r.content.readline() == b"first chunk\n"
            proc.send_signal(signal.SIGTERM)
            for r in (mitm, service):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.read(), 60)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    recs = [r for r in world.audit() if r["path"] == "/stall"]
    assert sorted(r["plane"] for r in recs) == ["mitm", "service"], json.dumps(recs)
    assert all(r["reason"] == "gateway-stopping" for r in recs), recs
