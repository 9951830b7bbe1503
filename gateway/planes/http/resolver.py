"""Dial `upstream.resolve` targets (like curl --resolve) while TLS still checks the real name."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gateway.policy.hosts import is_ip, normalise_host

ConnectTarget = Callable[[str, int], tuple[str, int]]


class OverrideResolver(AbstractResolver):
    """Dials `upstream.resolve` targets instead of what DNS says for a name.

    Only the address changes: the URL (and so the TLS server name and the certificate check)
    keeps the real host name.
    """

    def __init__(self, connect_target: ConnectTarget, fallback: AbstractResolver | None = None):
        self._target = connect_target
        self._fallback = fallback if fallback is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            key = (normalise_host(host), port)
        except ValueError:
            key = (host, port)
        thost, tport = self._target(*key)
        if is_ip(thost):
            ip = ipaddress.ip_address(thost.strip("[]"))
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=tport,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            ]
        found = await self._fallback.resolve(thost, tport, family)
        return [
            ResolveResult(
                hostname=host,
                host=r["host"],
                port=tport,
                family=r["family"],
                proto=r["proto"],
                flags=r["flags"],
            )
            for r in found
        ]

    async def close(self) -> None:
        await self._fallback.close()
