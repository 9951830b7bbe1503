"""Fake OpenAI and Anthropic endpoints for real SDK clients, on the fake upstream's app.

A streamed answer sends its first text, then holds the stream open until the client calls
`/release?gate=model` (after it has read that first text): a gateway that buffers the stream
would never let the client see it, so the test proves streaming without timing anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tests.support.upstream import Seen

GATE = "model"
FIRST, SECOND, UNRELEASED = "Hello", " world", " (never released: the stream was buffered)"

Record = Callable[[web.Request], Awaitable[None]]


def add_routes(app: web.Application, record: Record, seen: Seen) -> None:
    """OpenAI chat completions and Anthropic messages, plain and streamed (SSE)."""
    from tests.support.upstream import GATE_BOUND

    async def second_text() -> str:
        try:
            await asyncio.wait_for(seen.gate(GATE).get(), GATE_BOUND)
        except TimeoutError:
            seen.stalled_gates.append(GATE)
            return UNRELEASED
        return SECOND

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        return resp

    async def openai_chat(request: web.Request) -> web.StreamResponse:
        await record(request)
        body = await request.json()

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0}
            data |= {"model": body["model"], "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n".encode()

        if not body.get("stream"):
            message = {"role": "assistant", "content": FIRST + SECOND}
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                }
            )
        resp = await sse(request)
        await resp.write(chunk({"role": "assistant", "content": FIRST}))
        await resp.write(chunk({"content": await second_text()}))
        await resp.write(chunk({}, "stop") + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def anthropic_messages(request: web.Request) -> web.StreamResponse:
        await record(request)
        body = await request.json()
        usage = {"input_tokens": 1, "output_tokens": 2}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"]}
        message |= {"stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            text = {"type": "text", "text": FIRST + SECOND}
            return web.json_response({**message, "content": [text], "stop_reason": "end_turn"})

        def event(kind: str, **data: object) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        def delta(text: str) -> bytes:
            return event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})

        resp = await sse(request)
        await resp.write(
            event("message_start", message={**message, "content": [], "stop_reason": None})
            + event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            + delta(FIRST)
        )
        await resp.write(delta(await second_text()))
        await resp.write(
            event("content_block_stop", index=0)
            + event("message_delta", delta={"stop_reason": "end_turn"}, usage=usage)
            + event("message_stop")
        )
        await resp.write_eof()
        return resp

    app.router.add_route("POST", "/v1/chat/completions", openai_chat)
    app.router.add_route("POST", "/v1/messages", anthropic_messages)
