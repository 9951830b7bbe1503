"""A hostile reflecting upstream: raw HTTP/1.1 (TLS or plain) that hands back whatever credential
it received, in every form an agent could decode. aiohttp's server cannot do most of this
(arbitrary reason phrases, trailers, ignoring Accept-Encoding), so it is written on asyncio
streams. Every response ends with `Connection: close`.

Paths (the credential is the request's Authorization value, else X-Key):
  /reason              the credential as the reason phrase
  /enc/<codings>       the credential in a JSON body, content-coded with <codings> (comma list,
                       applied in order: gzip, deflate, rawdeflate, br, zstd, compress; a
                       query string is echoed, not read)
  /range               a fixed JSON body holding the credential; honours `Range: bytes=a-b`
  /forms               hex (both cases), UTF-16LE/BE and JSON \\uXXXX (mixed) forms
  /sse                 an event stream: the credential split over two data: lines of one event,
                       then over two events, then whole inside a JSON delta
  /trailers            a chunked body, the credential in a trailer field
  /enc-corrupt         a gzip body that stops being gzip part-way
Every request is logged to seen.jsonl with the trailer fields of a chunked body.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import ssl
import sys
import zlib
from pathlib import Path

import brotli
import zstandard


def credential(headers: dict[str, str]) -> str:
    return headers.get("authorization") or headers.get("x-key") or "none"


def escape_mixed(value: str) -> str:
    """Every other character as a JSON \\uXXXX escape, alternating hex case."""
    out = []
    for i, ch in enumerate(value):
        if i % 2:
            esc = f"\\u{ord(ch):04x}"
            out.append(esc if i % 4 == 1 else esc.upper().replace("\\U", "\\u"))
        else:
            out.append(ch)
    return "".join(out)


def encode(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "rawdeflate":
        c = zlib.compressobj(wbits=-15)
        return c.compress(data) + c.flush()
    if coding == "br":
        return brotli.compress(data)
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data  # "compress" and anything else: sent as labelled, undecodable by keyward


def chunked(*pieces: bytes, trailers: bytes = b"") -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return out + b"0\r\n" + trailers + b"\r\n"


def respond(method: str, path: str, headers: dict[str, str]) -> bytes:
    cred = credential(headers)
    echo = json.dumps({"path": path, "authorization": cred, "headers": headers}).encode()
    if path == "/reason":
        return head(200, cred, {"Content-Length": "2"}) + b"ok"
    if path == "/enc-corrupt":
        body = gzip.compress(echo)[:40] + b"\xff" * 64
        return (
            head(200, "OK", {"Content-Encoding": "gzip", "Content-Length": str(len(body))}) + body
        )
    if path.startswith("/enc/"):
        codings = path[5:].split("?")[0].split(",")
        body = echo
        for c in codings:
            body = encode(body, c)
        label = ", ".join("deflate" if c == "rawdeflate" else c for c in codings)
        return head(200, "OK", {"Content-Encoding": label, "Content-Length": str(len(body))}) + body
    if path == "/range":
        body = json.dumps({"padding": "x" * 40, "authorization": cred}).encode()
        wanted = headers.get("range", "")
        if wanted.startswith("bytes="):
            a, _, b = wanted[6:].partition("-")
            lo, hi = int(a), min(int(b) if b else len(body) - 1, len(body) - 1)
            part = body[lo : hi + 1]
            extra = {
                "Content-Range": f"bytes {lo}-{hi}/{len(body)}",
                "Content-Length": str(len(part)),
            }
            return head(206, "Partial Content", extra) + part
        return head(200, "OK", {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}) + body
    if path == "/forms":
        raw = cred.encode()
        body = b"\n".join(
            [
                b"hex " + raw.hex().encode(),
                b"HEX " + raw.hex().upper().encode(),
                b"le " + cred.encode("utf-16-le"),
                b"be " + cred.encode("utf-16-be"),
                b'json {"v": "' + escape_mixed(cred).encode() + b'"}',
            ]
        )
        return head(200, "OK", {"Content-Length": str(len(body))}) + body
    if path == "/sse":
        token = cred.split(" ")[-1].encode()
        half = len(token) // 2
        events = [
            b"data: " + token[:half] + b"\ndata: " + token[half:] + b"\n\n",
            b"data: " + token[:half] + b"\n\n",
            b"data: " + token[half:] + b"\n\n",
            b'data: {"delta": "' + token + b'"}\n\n',
        ]
        extra = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
        return head(200, "OK", extra) + chunked(*events)
    if path == "/trailers":
        extra = {"Transfer-Encoding": "chunked", "Trailer": "X-Echo", "Content-Type": "text/plain"}
        return head(200, "OK", extra) + chunked(
            b"body ok\n", trailers=f"X-Echo: {cred}\r\n".encode()
        )
    return head(200, "OK", {"Content-Length": str(len(echo))}) + echo


def head(status: int, reason: str, extra: dict[str, str]) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_chunked(reader: asyncio.StreamReader) -> dict[str, str]:
    """Read a chunked request body; its trailer fields, as received."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            break
        await reader.readexactly(size + 2)
    trailers = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        k, _, v = line.decode("latin-1").partition(":")
        trailers[k.strip().lower()] = v.strip()
    return trailers


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: Path | None
) -> None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        trailers: dict[str, str] = {}
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            trailers = await read_chunked(reader)
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps({"path": path, "headers": headers, "trailers": trailers}) + "\n")
        writer.write(respond(method, path, headers))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


class Hostile:
    """Start with `await Hostile.start(ssl_ctx)`; `.port`, `await .close()`."""

    def __init__(self, server: asyncio.Server, port: int) -> None:
        self.server, self.port = server, port

    @classmethod
    async def start(
        cls, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1", port: int = 0,
        log: Path | None = None,
    ) -> Hostile:  # fmt: skip
        server = await asyncio.start_server(
            lambda r, w: handle(r, w, log), host, port, ssl=ssl_context
        )
        return cls(server, server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def main() -> None:
    """HTTPS and HTTP at --host (443 and 80 by default, 0 = any), CA made in --dir; writes the
    bound ports to --dir/ready as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.pki import make_ca

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--tls-port", type=int, default=443)
    ap.add_argument("--plain-port", type=int, default=80)
    args = ap.parse_args()
    ca = make_ca(args.dir / "pki")
    ctx = ca.server_context(args.dir / "pki", *args.names)
    log = args.dir / "seen.jsonl"
    tls = await Hostile.start(ctx, args.host, args.tls_port, log)
    plain = await Hostile.start(None, args.host, args.plain_port, log)
    (args.dir / "ready").write_text(json.dumps({"tls": tls.port, "plain": plain.port}))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
