"""A fake upstream API: a real aiohttp server over real TLS, recording what reached it."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from tests.support import model_api

if TYPE_CHECKING:
    from gateway.pod.netns import NetNamespace

MAIN = Path(__file__).with_name("upstream_main.py")


GATE_BOUND = 30.0  # seconds a gated stream waits for its client before giving up (a hang)


@dataclass
class Seen:
    requests: list[dict[str, object]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    upload_started: asyncio.Event = field(default_factory=asyncio.Event)
    token_requests: int = 0
    token_fail: bool = False
    ws_messages: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Queue[None]] = field(default_factory=dict)
    stalled_gates: list[str] = field(default_factory=list)

    def gate(self, name: str) -> asyncio.Queue[None]:
        return self.gates.setdefault(name, asyncio.Queue())

    def release(self, name: str) -> None:
        """The client got the last event of the gated stream `name`: send the next one."""
        self.gate(name).put_nowait(None)


def make_app(seen: Seen) -> web.Application:
    async def record(request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            seen.peers.add((peer[0], peer[1]))
        seen.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "raw_path": request.raw_path,  # the target as it arrived, undecoded
                "headers": dict(request.headers),
            }
        )

    async def echo(request: web.Request) -> web.Response:
        await record(request)
        body = await request.read()
        seen.requests[-1]["body"] = body.decode("utf-8", "replace")[:65536]
        payload = {
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body": body.decode("utf-8", "replace")[:65536],
        }
        auth = request.headers.get("Authorization", "")
        return web.json_response(payload, headers={"X-Echo-Auth": auth})

    async def sse(request: web.Request) -> web.StreamResponse:
        """`?gate=NAME` sends each next event only once the client has released NAME (it got
        the previous one): a proxy that holds events back deadlocks into `stalled_gates`."""
        await record(request)
        n = int(request.query.get("n", "5"))
        interval = float(request.query.get("interval", "0.2"))
        gate = request.query.get("gate")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f"data: event {i}\n\n".encode())
            if gate is None:
                await asyncio.sleep(interval)
            elif i < n - 1:
                try:
                    await asyncio.wait_for(seen.gate(gate).get(), GATE_BOUND)
                except TimeoutError:
                    seen.stalled_gates.append(gate)
                    break
        await resp.write_eof()
        return resp

    async def release(request: web.Request) -> web.Response:
        """`/release?gate=NAME`: for a client in another process (see `sse`)."""
        await record(request)
        seen.release(request.query["gate"])
        return web.Response(text="released")

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request)
        size = int(request.query.get("size", "1048576"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        chunk = b"\0" * 65536
        left = size if request.method != "HEAD" else 0
        while left > 0:
            n = min(left, len(chunk))
            await resp.write(chunk[:n])
            left -= n
        await resp.write_eof()
        return resp

    async def split(request: web.Request) -> web.StreamResponse:
        """Echo the Authorization value in pieces, so the key straddles chunk boundaries."""
        await record(request)
        auth = request.headers.get("Authorization", "").encode()
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for piece in (b"data: " + auth[:9], auth[9:20], auth[20:31], auth[31:] + b"\n"):
            await resp.write(piece)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    async def hop(request: web.Request) -> web.Response:
        """Answers with every hop-by-hop header a proxy must not pass on."""
        await record(request)
        headers = {
            "Connection": "X-Hop-Resp",
            "X-Hop-Resp": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic realm=x",
            "Trailer": "X-Trailer",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        }
        return web.Response(text="ok", headers=headers)

    async def empty(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=204, headers={"X-Empty": "1"})

    async def hang(request: web.Request) -> web.Response:
        """Answers only after a minute (far past any timeout a test sets, however loaded), or
        with `?gate=NAME` once the test releases NAME."""
        await record(request)
        gate = request.query.get("gate")
        if gate is None:
            await asyncio.sleep(60)
        else:
            try:
                await asyncio.wait_for(seen.gate(gate).get(), GATE_BOUND)
            except TimeoutError:
                seen.stalled_gates.append(gate)
        return web.Response(text="late")

    async def stall(request: web.Request) -> web.StreamResponse:
        """Headers and a first chunk, then nothing for a long time (a stalled stream)."""
        await record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"first chunk\n")
        await asyncio.sleep(30)
        return resp

    async def upload(request: web.Request) -> web.Response:
        await record(request)
        total = 0
        async for chunk in request.content.iter_any():
            if total == 0 and chunk:
                seen.upload_started.set()
            total += len(chunk)
        return web.json_response({"received": total})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        await record(request)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.send_str(json.dumps({"authorization": request.headers.get("Authorization")}))
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                seen.ws_messages.append(msg.data)
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    async def ws_split(request: web.Request) -> web.WebSocketResponse:
        """Reflects the credential split across WebSocket messages: two text, two binary, three
        text; then `done`."""
        await record(request)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        cred = (request.headers.get("Authorization") or "none").encode()
        half, third = len(cred) // 2, len(cred) // 3
        for part in (cred[:half], cred[half:]):
            await sock.send_str(part.decode())
        for part in (b"bin:" + cred[:half], cred[half:] + b":bin"):
            await sock.send_bytes(part)
        for part in (cred[:third], cred[third : 2 * third], cred[2 * third :]):
            await sock.send_str(part.decode())
        await sock.send_str("done")
        await sock.close()
        return sock

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        seen.token_requests += 1
        if seen.token_fail:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        assert form.get("grant_type") in ("refresh_token", "client_credentials")
        return web.json_response(
            {"access_token": f"ya29.MINTED-{seen.token_requests:04d}-abcdefgh", "expires_in": 3600}
        )

    app = web.Application(client_max_size=1 << 34)
    app.router.add_route("POST", "/token", token)
    for name, handler in (
        ("sse", sse),
        ("big", big),
        ("upload", upload),
        ("split", split),
        ("hop", hop),
        ("empty", empty),
        ("hang", hang),
        ("stall", stall),
    ):  # also under /v1/, where services with an API-style base path send them
        app.router.add_route("*", f"/{name}", handler)
        app.router.add_route("*", f"/v1/{name}", handler)

    async def status(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"status": "as asked"}, status=int(request.match_info["code"]))

    app.router.add_route("GET", "/ws", ws)
    app.router.add_route("GET", "/release", release)
    model_api.add_routes(app, record, seen)
    app.router.add_route("GET", "/ws-split", ws_split)
    app.router.add_route("*", r"/status/{code:[1-5][0-9][0-9]}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


# A fake upstream must not refuse what a gateway wrongly forwards (a 1 MB header, 10,000
# headers, a 100 KB URL): it records it, so the test sees the leak.
PERMISSIVE_PARSER = {"max_line_size": 1 << 21, "max_field_size": 1 << 21, "max_headers": 20000}


class Upstream:
    """Start with `await Upstream.start(ssl_ctx)`; `.port`, `.seen`, `await .close()`."""

    def __init__(self, runner: web.AppRunner, port: int, seen: Seen) -> None:
        self.runner, self.port, self.seen = runner, port, seen

    @classmethod
    async def start(cls, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1") -> Upstream:
        seen = Seen()
        runner = web.AppRunner(
            make_app(seen), access_log=None, shutdown_timeout=0.5, **PERMISSIVE_PARSER
        )
        await runner.setup()
        site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return cls(runner, port, seen)

    async def close(self) -> None:
        await self.runner.cleanup()


def start_in_namespace(
    ns: NetNamespace, directory: Path, hosts: Sequence[str], names: Sequence[str]
) -> subprocess.Popen[bytes]:
    """`upstream_main.py` inside `ns` on `hosts`, ready, its test CA readable by every uid
    (the gateway drops root); it logs what it received to `directory/seen.jsonl`."""
    argv = [sys.executable, str(MAIN), "--dir", str(directory)]
    for host in hosts:
        argv += ["--host", host]
    proc = ns.exec([*argv, "--names", *names])
    deadline = time.monotonic() + 30
    while not (directory / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "fake upstream did not start"
        time.sleep(0.05)
    for d in (directory, directory / "pki"):
        d.chmod(0o755)
    (directory / "pki" / "test-ca.pem").chmod(0o644)
    return proc
