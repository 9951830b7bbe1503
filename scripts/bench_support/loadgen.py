"""An async HTTP/1.1 load generator for the benchmarks, run as its own process (pinned to a core
by the caller). It speaks what `wrk` cannot: HTTPS through an explicit proxy (CONNECT, then TLS
inside the tunnel), keep-alive, chunked responses, event streams and streamed bodies.

Every loop is bounded in count and in time. Prints one JSON object on stdout:
- `rps`:  {"requests", "errors", "seconds", "rps", "p50_ms", "p99_ms", "min_ms", "max_ms"}
- `sse`:  {"delays_ms": [...], "ttfe_ms": [...], "events", "errors"}
- `body`: {"bytes", "seconds", "mb_s"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections.abc import Callable

CHUNK = 1 << 20
MAX_HEAD = 1 << 16


class Target:
    """Where to connect and how: plain, TLS, or TLS inside a CONNECT tunnel."""

    def __init__(self, args: argparse.Namespace) -> None:
        host, _, port = args.connect.rpartition(":")
        self.host, self.port = host, int(port)
        self.tunnel: str | None = args.tunnel
        self.authority: str = args.authority
        self.ssl: ssl.SSLContext | None = None
        self.sni: str | None = args.sni
        if args.tls:
            ctx = ssl.create_default_context()
            for cafile in args.cafile or ():
                ctx.load_verify_locations(cafile=cafile)
            ctx.set_alpn_protocols(["http/1.1"])
            self.ssl = ctx

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD)
        if self.tunnel:
            writer.write(f"CONNECT {self.tunnel} HTTP/1.1\r\nHost: {self.tunnel}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if head[9:12] != b"200":
                writer.close()
                raise ConnectionError(f"CONNECT refused: {head[:40]!r}")
        if self.ssl is not None:
            await writer.start_tls(self.ssl, server_hostname=self.sni or self.host)
        return reader, writer

    def request(self, method: str, path: str, extra: str = "") -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {self.authority}\r\n"
            f"User-Agent: keyward-bench\r\nAccept: */*\r\n{extra}\r\n"
        ).encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head[9:12]), head.lower()


def content_length(head: bytes) -> int | None:
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        return None
    return int(head[i + 17 : head.index(b"\r\n", i + 2)])


async def read_exactly(
    reader: asyncio.StreamReader, n: int, sink: Callable[[bytes], None] | None, what: str
) -> None:
    """`n` bytes, in pieces as they arrive (never all in memory), each passed to `sink`."""
    while n:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise ConnectionError(f"{what} cut short")
        n -= len(data)
        if sink is not None:
            sink(data)


async def read_body(
    reader: asyncio.StreamReader, head: bytes, sink: Callable[[bytes], object] | None = None
) -> int:
    """Read (and discard) a body framed by Content-Length, chunked or close; `sink(bytes)`
    sees each piece as it arrives. Returns the body length."""
    total = 0
    length = content_length(head)
    if length is not None:
        await read_exactly(reader, length, sink, "body")
        return length
    if b"transfer-encoding: chunked" in head:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return total
            await read_exactly(reader, size, sink, "chunk")
            total += size
            await reader.readexactly(2)
    while data := await reader.read(CHUNK):
        total += len(data)
        if sink is not None:
            sink(data)
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_rps(args: argparse.Namespace) -> dict[str, float]:
    target = Target(args)
    request = target.request("GET", args.path)
    conns = []
    for _ in range(args.concurrency):  # connect and warm every connection before the clock
        reader, writer = await target.connect()
        writer.write(request)
        _, head = await read_head(reader)
        await read_body(reader, head)
        conns.append((reader, writer))
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + args.duration

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal issued, errors
        perf = time.perf_counter
        while issued < args.requests and perf() < deadline and errors <= args.max_errors:
            issued += 1
            t0 = perf()
            try:
                writer.write(request)
                status, head = await read_head(reader)
                await read_body(reader, head)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                writer.close()
                try:
                    reader, writer = await target.connect()
                except OSError:
                    await asyncio.sleep(0.01)
                continue
            if status != 200:
                errors += 1
            latencies.append(perf() - t0)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    seconds = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 4),
        "rps": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "min_ms": round(min(ms), 3) if ms else 0.0,
        "max_ms": round(max(ms), 3) if ms else 0.0,
    }


async def run_sse(args: argparse.Namespace) -> dict[str, object]:
    target = Target(args)
    reader, writer = await target.connect()
    writer.write(target.request("GET", "/warm"))  # warm the connection (and the tunnel)
    _, head = await read_head(reader)
    await read_body(reader, head)
    delays: list[float] = []
    ttfe: list[float] = []
    errors = 0
    path = f"/sse?n={args.events}&interval={args.interval}"
    deadline = time.monotonic() + args.duration
    for _ in range(args.repeats):
        if time.monotonic() > deadline:
            break
        buf = bytearray()
        first: list[float] = []
        sent = time.monotonic()
        writer.write(target.request("GET", path))

        def sink(data: bytes, buf: bytearray = buf, first: list[float] = first) -> None:
            now = time.monotonic()
            buf.extend(data)
            while (end := buf.find(b"\n\n")) >= 0:
                event = bytes(buf[:end])
                del buf[: end + 2]
                fields = event.split(b" ")
                if len(fields) != 3 or fields[0] != b"data:":
                    continue
                delays.append((now - float(fields[2])) * 1000)
                if not first:
                    first.append(now)

        status, head = await read_head(reader)
        await asyncio.wait_for(read_body(reader, head, sink), args.events * args.interval + 30)
        if status != 200 or not first:
            errors += 1
            continue
        ttfe.append((first[0] - sent) * 1000)
    writer.close()
    return {
        "delays_ms": [round(d, 4) for d in delays],
        "ttfe_ms": [round(t, 4) for t in ttfe],
        "events": len(delays),
        "errors": errors,
    }


async def run_body(args: argparse.Namespace) -> dict[str, float]:
    target = Target(args)
    reader, writer = await target.connect()
    size = args.size
    start = time.perf_counter()
    if args.direction == "down":
        writer.write(target.request("GET", f"/big?size={size}"))
        status, head = await read_head(reader)
        got = await read_body(reader, head)
    else:
        writer.write(target.request("POST", "/upload", f"Content-Length: {size}\r\n"))
        block = memoryview(bytes(CHUNK))
        left = size
        while left > 0:
            n = min(left, CHUNK)
            writer.write(block[:n])
            await writer.drain()
            left -= n
        status, head = await read_head(reader)
        body = bytearray()
        await read_body(reader, head, body.extend)
        got = int(json.loads(bytes(body))["received"])
    seconds = time.perf_counter() - start
    writer.close()
    if status != 200 or got != size:
        raise SystemExit(f"body {args.direction}: status {status}, {got} of {size} bytes")
    return {"bytes": size, "seconds": round(seconds, 4), "mb_s": round(size / seconds / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=("rps", "sse", "body"))
    ap.add_argument("--connect", required=True, help="HOST:PORT to open TCP to")
    ap.add_argument("--tunnel", help="send CONNECT AUTHORITY first (explicit proxy)")
    ap.add_argument("--authority", required=True, help="Host header value")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--sni")
    ap.add_argument("--cafile", action="append")
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0, help="time cap, seconds")
    ap.add_argument("--max-errors", type=int, default=100)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--direction", choices=("down", "up"), default="down")
    ap.add_argument("--size", type=int, default=1 << 26)
    args = ap.parse_args()
    runner = {"rps": run_rps, "sse": run_sse, "body": run_body}[args.mode]
    budget = args.duration + 120  # connection set-up and the last requests, bounded too
    result = asyncio.run(asyncio.wait_for(runner(args), budget))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
