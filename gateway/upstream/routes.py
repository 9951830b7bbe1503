"""Where a verified host:port is dialled, and the check of every address before it is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config.compile import parse_nameservers, parse_resolve
from gateway.config.model import UpstreamConfig
from gateway.dns.resolver import Resolver
from gateway.errors import AddressRefused
from gateway.policy.hosts import is_ip, normalise_host

# (verified name, port, address about to be connected) -> the special-address category no rule
# allows it to reach, or None. `Policy.address_refusal`; passed per dial, as a reload swaps it.
AddressCheck = Callable[[str, int, str], str | None]


@dataclass(frozen=True)
class Routes:
    """`upstream.resolve` targets (like curl --resolve) and the resolver for everything else.
    Replaced as a whole on reload."""

    overrides: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    resolver: Resolver = field(default_factory=Resolver)

    @classmethod
    def from_config(cls, upstream: UpstreamConfig) -> Routes:
        return cls(
            overrides=parse_resolve(upstream.resolve),
            resolver=Resolver(upstream=parse_nameservers(upstream.nameservers)),
        )

    def target(self, host: str, port: int) -> tuple[str, int]:
        """Where a (verified) host:port is actually dialled: `upstream.resolve` or itself."""
        return self.overrides.get((host, port), (host, port))

    async def addresses(
        self, host: str, port: int, check: AddressCheck, *, via: tuple[str, int] | None = None
    ) -> list[tuple[str, int]]:
        """The checked addresses to connect to for the verified `host`:`port`.

        `via` is where the connection is already headed (a transparent original destination,
        or a target already routed): it is checked, or resolved and checked, in place of the
        `upstream.resolve` target. Otherwise the `upstream.resolve`
        target or the name itself is resolved once, and every answer is checked, so what is
        dialled is exactly what was checked (a rebinding name cannot change it in between).
        Raises AddressRefused (reason private-address) or the resolver's errors.
        """
        name = normalise_host(host)
        thost, tport = via if via is not None else self.target(name, port)
        addrs = [thost.strip("[]")] if is_ip(thost) else await self.resolver.addresses(thost)
        for addr in addrs:
            category = check(name, port, addr)
            if category is not None:
                raise AddressRefused(name, addr, category)
        return [(a, tport) for a in addrs]
