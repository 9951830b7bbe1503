"""A fake upstream host for namespace tests, run as its own process inside the upstream
namespace. HTTPS and HTTP on the given address, plus raw TCP and UDP canaries that log every
connection or datagram that reaches them (anything there is a leak)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiohttp import web

from tests.support.pki import make_ca
from tests.support.upstream import PERMISSIVE_PARSER, Seen, make_app


class Canary(asyncio.DatagramProtocol):
    def __init__(self, log: Path) -> None:
        self.log = log

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"udp": addr[0], "bytes": len(data)}) + "\n")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--host", action="append", required=True)
    ap.add_argument("--names", nargs="+", required=True)
    args = ap.parse_args()
    ca = make_ca(args.dir / "pki")
    ssl_ctx = ca.server_context(args.dir / "pki", *args.names)
    seen = Seen()
    log = args.dir / "seen.jsonl"

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        with log.open("a") as f:
            f.write(
                json.dumps(
                    {
                        "host": request.host,
                        "method": request.method,
                        "path": request.path,
                        "raw_path": request.raw_path,
                        "local": request.transport.get_extra_info("sockname")[0],
                        "headers": dict(request.headers),
                    }
                )
                + "\n"
            )
        return await handler(request)

    app = make_app(seen)
    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, **PERMISSIVE_PARSER)
    await runner.setup()
    for host in args.host:
        await web.TCPSite(runner, host, 443, ssl_context=ssl_ctx).start()
        await web.TCPSite(runner, host, 80).start()

        async def tcp_canary(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with log.open("a") as f:
                f.write(json.dumps({"tcp": writer.get_extra_info("sockname")[1]}) + "\n")
            writer.write(b"UPSTREAM-CANARY\r\n")
            await writer.drain()
            writer.close()

        for port in (22, 9999):
            await asyncio.start_server(tcp_canary, host, port)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: Canary(log), local_addr=(host, 9999))
    (args.dir / "ready").write_text("ok")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
