"""The one TLS context upstream connections verify with."""

from __future__ import annotations

import ssl

from gateway.tls.ca import system_roots_path


class UpstreamTLS:
    """Verified TLS to upstreams: system roots plus `upstream.ca_bundle`. Built on first use
    (loading the roots costs ~70 ms a config without upstream TLS never needs) and shared by
    the service plane and the token minter; the mitm plane reads `ca_file` for its own store."""

    def __init__(self, ca_file: str | None = None) -> None:
        self.ca_file = ca_file
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            roots = system_roots_path()
            ctx = ssl.create_default_context(cafile=str(roots) if roots else None)
            if self.ca_file:
                ctx.load_verify_locations(cafile=self.ca_file)
            self._context = ctx
        return self._context
