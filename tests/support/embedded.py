"""The embedded gateway (what `keyward run` starts) in the test's own process, with a client
for each plane: the mitm plane as an explicit proxy and the service plane by base URL."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.config.loader import load_config
from gateway.planes.context import GatewayContext
from gateway.runtime.assemble import build_context
from gateway.runtime.embedded import EmbeddedGateway
from tests.support.world import REAL_KEY, World

SERVICE = """services:
  api: {{ listen: 0, upstream: "https://api.example.test" }}
"""


@dataclass
class Running:
    world: World
    ctx: GatewayContext
    gw: EmbeddedGateway
    client: aiohttp.ClientSession

    @property
    def proxy(self) -> str:
        return self.gw.proxy_url

    def service_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.gw.service_ports['api']}{path}"

    async def via_proxy(self, path: str, host: str = "api.example.test") -> tuple[int, str, str]:
        """(status, X-Keyward-Reason, body) of a GET through the mitm plane."""
        try:
            async with self.client.get(f"https://{host}{path}", proxy=self.proxy) as r:
                return r.status, r.headers.get("X-Keyward-Reason", ""), await r.text()
        except aiohttp.ClientHttpProxyError as e:  # the CONNECT itself was answered
            return e.status, (e.headers or {}).get("X-Keyward-Reason", ""), ""

    async def via_service(self, path: str) -> tuple[int, str, str]:
        async with self.client.get(self.service_url(path)) as r:
            return r.status, r.headers.get("X-Keyward-Reason", ""), await r.text()


def with_service(world: World, extra: str = "", audit: Path | None = None) -> None:
    """Add the `api` service (and any `extra` top-level YAML) to the world's config."""
    text = world.config.read_text()
    if audit is not None:
        text = text.replace("path: audit.jsonl", f"path: {audit}")
    world.config.write_text(text + SERVICE.format() + extra)


@asynccontextmanager
async def running(world: World, audit_path: str | None = None) -> AsyncIterator[Running]:
    environ = {"TEST_API_KEY": REAL_KEY}
    ctx = build_context(
        load_config(world.config), world.dir / "state", audit_path=audit_path, environ=environ
    )
    gw = EmbeddedGateway(ctx)
    await gw.start()
    trust = ssl.create_default_context(cafile=str(ctx.ca.cert_path))
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust, force_close=True))
    try:
        yield Running(world, ctx, gw, client)
    finally:
        await client.close()
        await gw.close()
        ctx.audit.close()
