"""WebSocket reflection split across messages: an upstream that holds the real key sends it back
to the agent in pieces, one per message (text and binary, two and three pieces). Each message is
scrubbed with what the previous ones may have started: the agent gets every message, each whole,
and never more than the first `MESSAGE_CUT - 1` bytes of the key. mitm plane (the service plane
relays no WebSocket), explicit mode under `keyward run`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import textwrap

import pytest

from gateway.planes.scrub import MESSAGE_CUT
from tests.support.world import REAL_KEY, World, make_world

AGENT = """
import asyncio, base64, json, os, aiohttp
async def main():
    got = []
    async with aiohttp.ClientSession() as s:
        proxy = os.environ["HTTPS_PROXY"]
        async with s.ws_connect("wss://api.example.test/ws-split", proxy=proxy) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    got.append(["text", msg.data])
                    if msg.data == "done":
                        break
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    got.append(["binary", base64.b64encode(msg.data).decode()])
    print(json.dumps(got))
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def messages(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    async def go() -> list[tuple[str, bytes]]:
        world = await make_world(tmp_path_factory.mktemp("ws-split"))
        try:
            return await attack(world)
        finally:
            await world.upstream.close()

    return asyncio.run(go())


async def attack(world: World) -> list[tuple[str, bytes]]:
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(sys.executable, "-c", textwrap.dedent(AGENT)),
        env=world.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=world.dir,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    got = json.loads(out.decode().strip().splitlines()[-1])
    return [(k, v.encode() if k == "text" else base64.b64decode(v)) for k, v in got]


def test_every_message_arrives_in_order(messages: list[tuple[str, bytes]]) -> None:
    kinds = [k for k, _ in messages]
    assert kinds == ["text", "text", "binary", "binary", "text", "text", "text", "text"]
    assert messages[-1] == ("text", b"done")
    assert messages[2][1].startswith(b"bin:") and messages[3][1].endswith(b":bin")


def test_key_split_across_messages_does_not_come_back(
    messages: list[tuple[str, bytes]],
) -> None:
    joined = b"".join(v for _, v in messages)
    key = REAL_KEY.encode()
    assert key not in joined
    for start in range(len(key) - MESSAGE_CUT + 1):  # no run of MESSAGE_CUT key bytes
        assert key[start : start + MESSAGE_CUT] not in joined, key[start : start + MESSAGE_CUT]
