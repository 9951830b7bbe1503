"""SIGTERM drains `keyward run` as it drains `serve`: the gateway stops accepting, a request in
flight finishes within --drain, one still live after it is cut and audited, and a CMD that
outlives the drain is stopped (it has no gateway left)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.world import World, make_world

# CMD: ignores SIGTERM (as an agent finishing its turn would), prints its proxy port, then asks
# for PATH through the gateway and prints what came back.
CHILD = """
import os, signal, sys, urllib.parse, urllib.request
signal.signal(signal.SIGTERM, lambda *_: None)
print(urllib.parse.urlsplit(os.environ["HTTPS_PROXY"]).port, flush=True)
r = urllib.request.urlopen("https://api.example.test" + sys.argv[1], timeout=300)
print(r.readline().decode().strip(), flush=True)
try:
    print(r.read().decode().strip(), flush=True)
except Exception as e:
    print("cut", type(e).__name__, flush=True)
"""


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    (tmp_path / "child.py").write_text(CHILD)
    yield w
    await w.upstream.close()


async def start(world: World, path: str, drain: float) -> tuple[asyncio.subprocess.Process, int]:
    argv = world.run_argv(sys.executable, str(world.dir / "child.py"), path)
    argv.insert(argv.index("--"), "--drain")
    argv.insert(argv.index("--"), str(drain))
    proc = await asyncio.create_subprocess_exec(
        *argv, env=world.env(), cwd=world.dir, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int(await asyncio.wait_for(proc.stdout.readline(), 120))
    for _ in range(6000):  # until the request is at the upstream (in flight in the gateway)
        if any(str(r["path"]).startswith(path) for r in world.upstream.seen.requests):
            break
        await asyncio.sleep(0.01)
    return proc, port


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_request_in_flight_finishes_and_new_connections_are_refused(world: World) -> None:
    # the upstream answers once released: the request is in flight until the drain has begun
    proc, port = await start(world, "/hang?gate=drain", drain=120)
    try:
        proc.send_signal(signal.SIGTERM)
        refused_while_draining = False
        while proc.returncode is None and not refused_while_draining:
            refused_while_draining = await asyncio.to_thread(refuses, port)
            await asyncio.sleep(0.05)
        world.upstream.seen.release("drain")
        assert proc.stdout is not None
        out = (await asyncio.wait_for(proc.stdout.read(), 120)).decode()
        assert await asyncio.wait_for(proc.wait(), 120) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert refused_while_draining
    assert "late" in out
    [rec] = [r for r in world.audit() if str(r["path"]).startswith("/hang")]
    assert rec["status"] == 200 and not rec["error"]


async def test_stream_past_the_drain_bound_is_cut_audited_and_cmd_stopped(world: World) -> None:
    proc, _ = await start(world, "/stall", drain=1)  # silent for 30 s after a first chunk
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 120) == b"first chunk\n"
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code != 0  # killed: it outlived the drain (the stall alone ends in 30 s, 0)
    [rec] = [r for r in world.audit() if r["path"] == "/stall"]
    assert rec["reason"] == "gateway-stopping", rec
