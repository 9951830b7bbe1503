"""The embedded gateway of `keyward run`: both planes in-process on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gateway.credentials.oauth import TokenMinter
from gateway.planes.context import GatewayContext
from gateway.planes.drain import drain_planes
from gateway.planes.http.proxy import HttpPlane
from gateway.planes.mitm.master import MitmPlane, start_mitm
from gateway.runtime.assemble import freeze_startup_heap
from gateway.tls.ca import write_bundle
from gateway.tls.trust import agent_env, is_proxy_var


@dataclass
class EmbeddedGateway:
    ctx: GatewayContext
    mitm: MitmPlane | None = None
    http: HttpPlane | None = None
    minter: TokenMinter | None = None
    service_ports: dict[str, int] = field(default_factory=dict)
    # Per run: the agent's CA bundle (certificate only) lives here, removed on close.
    trust_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="keyward-run-")))

    async def start(self, host: str = "127.0.0.1") -> None:
        self.minter = self.ctx.start_token_minter()
        self.mitm = await start_mitm(self.ctx, [f"regular@{host}:0"])
        self.http = HttpPlane(self.ctx)
        self.service_ports = await self.http.start(host)
        freeze_startup_heap()

    async def drain(self, seconds: float) -> None:
        """Stop accepting; in-flight requests and streams get up to `seconds` (as `serve`)."""
        await drain_planes(seconds, self.mitm, self.http)

    async def close(self) -> None:
        if self.mitm is not None:
            await self.mitm.close()
        if self.http is not None:
            await self.http.close()
        if self.minter is not None:
            await self.minter.close()
        shutil.rmtree(self.trust_dir, ignore_errors=True)

    @property
    def proxy_url(self) -> str:
        assert self.mitm is not None
        host, port = self.mitm.addresses[0]
        return f"http://{host}:{port}"

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The agent's environment: proxy, trust and placeholder variables; no real secret."""
        env = dict(os.environ if base is None else base)
        for name in self.ctx.secrets.env_vars():
            env.pop(name, None)
        for name in list(env):
            if is_proxy_var(name):
                del env[name]
        bundle = write_bundle(self.ctx.ca, self.trust_dir / "ca-bundle.pem")
        env.update(agent_env(str(bundle), self.proxy_url, bypass_loopback=bool(self.service_ports)))
        for ph in self.ctx.placeholders:
            env[ph.env] = ph.value
        for name, port in self.service_ports.items():
            key = name.upper().replace("-", "_")
            env[f"KEYWARD_SERVICE_{key}_URL"] = f"http://127.0.0.1:{port}"
        return env
