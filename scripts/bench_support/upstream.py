"""A fast local upstream for the benchmarks: a minimal HTTP/1.1 keep-alive server on raw
asyncio protocols, over HTTPS (a test CA's leaf) and plain HTTP, on 127.0.0.1 only.

Prints one JSON line `{"https": PORT, "http": PORT}` when listening, then serves until SIGTERM
or until its stdin closes.

Routes:
- `GET /sse?n=N&interval=S`: an event stream of N events S seconds apart; each event is
  `data: <i> <sender's time.monotonic()>` (CLOCK_MONOTONIC is shared by every process).
- `GET /big?size=N`: N zero bytes with a Content-Length.
- `POST /upload`: reads and discards the body (Content-Length or chunked), answers
  `{"received": N}`.
- anything else: a small fixed JSON body (the request-rate figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
from urllib.parse import parse_qs, urlsplit

SMALL_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 40}}],
    }
).encode()
SMALL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(SMALL_BODY)).encode()
    + b"\r\n\r\n"
    + SMALL_BODY
)
BIG_CHUNK = memoryview(bytes(256 * 1024))
MAX_HEAD = 64 * 1024


class ChunkedBody:
    """Consumes a chunked request body from a buffer, counting payload bytes."""

    def __init__(self) -> None:
        self.state = "size"
        self.left = 0
        self.total = 0

    def feed(self, buf: bytearray) -> bool:
        """Eat what `buf` holds; True once the terminating chunk and trailers are read."""
        while True:
            if self.state == "size":
                i = buf.find(b"\r\n")
                if i < 0:
                    return False
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[: i + 2]
                self.state, self.left = ("trailer", 0) if size == 0 else ("data", size)
            elif self.state == "data":
                n = min(self.left, len(buf))
                del buf[:n]
                self.left -= n
                self.total += n
                if self.left:
                    return False
                self.state = "crlf"
            elif self.state == "crlf":
                if len(buf) < 2:
                    return False
                del buf[:2]
                self.state = "size"
            else:
                i = buf.find(b"\r\n")
                if i < 0:
                    return False
                empty = i == 0
                del buf[: i + 2]
                if empty:
                    return True


class Http1(asyncio.Protocol):
    """One keep-alive connection: parse a request, drain its body, answer, repeat."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: tuple[str, str, dict[str, str]] | None = None
        self.body_left = 0
        self.chunked: ChunkedBody | None = None
        self.received = 0
        self.busy = False  # a streamed response is being written
        self.paused = False
        self.resume: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        while self.transport is not None and not self.busy:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self.transport.close()
                    return
                lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
                del self.buf[: end + 4]
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.head = (method, target, headers)
                self.received = 0
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self.chunked, self.body_left = ChunkedBody(), 0
                else:
                    self.chunked, self.body_left = None, int(headers.get("content-length", "0"))
            if self.chunked is not None:
                if not self.chunked.feed(self.buf):
                    return
                self.received = self.chunked.total
            else:
                n = min(self.body_left, len(self.buf))
                del self.buf[:n]
                self.body_left -= n
                self.received += n
                if self.body_left:
                    return
            head, self.head = self.head, None
            self._respond(*head)

    def _respond(self, method: str, target: str, headers: dict[str, str]) -> None:
        assert self.transport is not None
        path = target.split("?", 1)[0]
        if path == "/upload":
            body = json.dumps({"received": self.received}).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
        elif path in ("/big", "/sse"):
            query = parse_qs(urlsplit(target).query)
            self.busy = True
            if path == "/big":
                coro = self._big(int(query.get("size", ["1048576"])[0]))
            else:
                n = int(query.get("n", ["10"])[0])
                coro = self._sse(n, float(query.get("interval", ["0.01"])[0]))
            asyncio.get_running_loop().create_task(coro)
        else:
            self.transport.write(SMALL_RESPONSE)
        if headers.get("connection", "").lower() == "close":
            self.transport.close()

    async def _drain(self) -> None:
        while self.paused and self.transport is not None:
            self.resume = asyncio.get_running_loop().create_future()
            await self.resume

    async def _big(self, size: int) -> None:
        if self.transport is None:
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
            + str(size).encode()
            + b"\r\n\r\n"
        )
        left = size
        while left > 0 and self.transport is not None:
            await self._drain()
            if self.transport is None:
                return
            n = min(left, len(BIG_CHUNK))
            self.transport.write(BIG_CHUNK[:n])
            left -= n
        self._done()

    async def _sse(self, n: int, interval: float) -> None:
        if self.transport is None:
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        start = time.monotonic()
        for i in range(n):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.transport is None:
                return
            event = f"data: {i} {time.monotonic():.6f}\n\n".encode()
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        if self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        self._done()

    def _done(self) -> None:
        self.busy = False
        if self.transport is not None:
            self._process()


async def serve(cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    tls.set_alpn_protocols(["http/1.1"])
    https = await loop.create_server(Http1, "127.0.0.1", 0, ssl=tls, backlog=1024)
    http = await loop.create_server(Http1, "127.0.0.1", 0, backlog=1024)
    ports = {
        "https": https.sockets[0].getsockname()[1],
        "http": http.sockets[0].getsockname()[1],
    }
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    fd = sys.stdin.fileno()
    loop.add_reader(fd, lambda: None if os.read(fd, 4096) else stop.set())
    await stop.wait()
    https.close()
    http.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.cert, args.key))


if __name__ == "__main__":
    main()
