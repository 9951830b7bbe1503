"""aiohttp connections through the gateway's one dial path (`GatewayContext.dial_addresses`):
`upstream.resolve` targets (like curl --resolve), the configured name servers, and the
private-address guard on every answer, while TLS still checks the real name."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.errors import ResolveError

# (verified host, port) -> the checked (address, port) pairs to connect to. Raises
# AddressRefused for a private address no rule allows, ResolveError if nothing was found.
Dial = Callable[[str, int], Awaitable[list[tuple[str, int]]]]


class DialResolver(AbstractResolver):
    """Hands aiohttp only addresses the dial path checked.

    Only the address changes: the URL (and so the TLS server name and the certificate check)
    keeps the real host name. A refusal propagates as AddressRefused, which aiohttp does not
    wrap, so the plane can answer it as a 403.
    """

    def __init__(self, dial: Dial) -> None:
        self._dial = dial

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            found = await self._dial(host, port)
        except ResolveError as e:  # aiohttp reports an OSError as a DNS failure
            raise OSError(f"cannot resolve {host}: {e}") from e
        out = []
        for addr, tport in found:
            ip = ipaddress.ip_address(addr)
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            out.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=tport,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        return out

    async def close(self) -> None:
        return None


def make_connector(
    dial: Dial | None, ssl_context: ssl.SSLContext, **options: Any
) -> aiohttp.TCPConnector:
    """A connector that dials only checked addresses and verifies with the upstream context."""
    resolver = DialResolver(dial) if dial is not None else None
    return aiohttp.TCPConnector(ssl=ssl_context, resolver=resolver, **options)
