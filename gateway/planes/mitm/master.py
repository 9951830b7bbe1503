"""mitmproxy embedded in-process: a Master with only the addons keyward needs, and our CA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.planes.context import GatewayContext
from gateway.planes.mitm import errors
from gateway.planes.mitm.addons import TransparentVerifier, addon_chain
from gateway.planes.mitm.chain import AddonChain
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

if TYPE_CHECKING:
    from mitmproxy.certs import CertStore

log = logging.getLogger("keyward.mitm")


# The options for which mitmproxy's TlsConfig (re)loads its CA from files in `confdir`.
_CERTSTORE_OPTIONS = frozenset({"certs", "confdir", "key_size", "cert_passphrase"})


class InMemoryTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TLS addon, signing with keyward's CA held in memory: it never reads or
    writes a confdir, so no copy of the CA key is ever on disk for mitmproxy."""

    def __init__(self, store: CertStore) -> None:
        super().__init__()
        self.certstore = store
        self._store = store

    def configure(self, updated: Collection[str] | str) -> None:
        # mitmproxy's own `running` hook passes the bare string "confdir".
        names = {updated} if isinstance(updated, str) else set(updated)
        tlsconfig.TlsConfig.configure(self, names - _CERTSTORE_OPTIONS)
        self.certstore = self._store


@dataclass
class MitmPlane:
    master: Master
    task: asyncio.Task[None]
    addresses: list[tuple[str, int]]

    async def drain(self, seconds: float) -> None:
        """Stop listening; wait up to `seconds` for live requests and streams; audit the rest
        as cut (`close` then closes them)."""
        ps = self.master.addons.get("proxyserver")
        for server in list(ps.servers):
            with contextlib.suppress(Exception):
                await server.stop()
        chain = self.master.addons.get(AddonChain.name)
        drain = chain.get("drain") if chain is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while drain is not None and drain.flows and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if drain is not None:
            cut = drain.cut_all()
            if cut:
                log.warning("drain bound reached: %d live request(s) cut", cut)

    async def close(self) -> None:
        self.master.shutdown()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, timeout=10)


def upstream_trust_file(ctx: GatewayContext) -> Path:
    """mitmproxy takes one CA file for upstream verification: system roots + upstream.ca_bundle."""
    extra = Path(ctx.upstream_tls.ca_file).read_bytes() if ctx.upstream_tls.ca_file else b""
    return write_with_system_roots(ctx.state_dir / "upstream-trust.pem", extra)


async def start_mitm(
    ctx: GatewayContext,
    modes: list[str],
    *,
    verify_transparent: TransparentVerifier | None = None,
) -> MitmPlane:
    """Start mitmproxy with `modes` (e.g. ["regular@127.0.0.1:0"]) and wait until it listens."""
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # its per-listener chatter
    errors.install()
    opts = options.Options()
    master = Master(opts)
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        InMemoryTlsConfig(ctx.ca.mitmproxy_certstore()),
        disable_h2c.DisableH2C(),
        AddonChain(addon_chain(ctx, verify_transparent)),
    )
    opts.update(
        mode=modes,
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
