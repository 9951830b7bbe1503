"""mitmproxy embedded in-process: a Master with only the addons keyward needs, and our CA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.planes.context import GatewayContext
from gateway.planes.mitm.addons import TransparentVerifier, addon_chain
from gateway.planes.mitm.loader import (
    Master,
    core,
    disable_h2c,
    next_layer,
    options,
    proxyserver,
    tlsconfig,
)
from gateway.tls.ca import write_with_system_roots

log = logging.getLogger("keyward.mitm")


@dataclass
class MitmPlane:
    master: Master
    task: asyncio.Task[None]
    addresses: list[tuple[str, int]]

    async def close(self) -> None:
        self.master.shutdown()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, timeout=10)


def upstream_trust_file(ctx: GatewayContext) -> Path:
    """mitmproxy takes one CA file for upstream verification: system roots + upstream.ca_bundle."""
    extra = Path(ctx.upstream_ca_file).read_bytes() if ctx.upstream_ca_file else b""
    return write_with_system_roots(ctx.state_dir / "upstream-trust.pem", extra)


async def start_mitm(
    ctx: GatewayContext,
    modes: list[str],
    *,
    verify_transparent: TransparentVerifier | None = None,
) -> MitmPlane:
    """Start mitmproxy with `modes` (e.g. ["regular@127.0.0.1:0"]) and wait until it listens."""
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # its per-listener chatter
    opts = options.Options()
    master = Master(opts)
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        *addon_chain(ctx, verify_transparent),
    )
    opts.update(
        mode=modes,
        confdir=str(ctx.ca.mitmproxy_confdir),
        connection_strategy="lazy",
        ssl_verify_upstream_trusted_ca=str(upstream_trust_file(ctx)),
        http2=True,
        websocket=True,
        rawtcp=True,
        # No body_size_limit: mitmproxy applies it even to streamed bodies, and ours always stream.
    )
    task = asyncio.create_task(master.run(), name="keyward-mitm")
    ps = master.addons.get("proxyserver")
    for _ in range(500):
        if task.done():
            task.result()
            raise RuntimeError("mitmproxy stopped during start-up")
        addrs = ps.listen_addrs()
        if addrs and all(s.is_running for s in ps.servers):
            return MitmPlane(master, task, [(a[0], a[1]) for a in addrs])
        await asyncio.sleep(0.01)
    master.shutdown()
    raise RuntimeError("mitmproxy did not start listening within 5 s")
