"""Naming a transparent connection: only an IP was dialled, so the name the client claims
(SNI, Host) is believed only if keyward itself answered that name with that IP."""

from __future__ import annotations

from collections.abc import Callable

from gateway.policy.addresses import ip_key
from gateway.policy.hosts import is_ip, normalise_host, split_hostport


def make_verifier(
    names_for: Callable[[str], set[str]],
    connect_target: Callable[[str, int], tuple[str, int]],
) -> Callable[[str, int, str | None, str | None], str | None]:
    def verify(ip: str, port: int, sni: str | None, host_header: str | None) -> str | None:
        claimed = sni
        if claimed is None and host_header:
            try:
                claimed = split_hostport(host_header)[0]
            except ValueError:
                return None
        if not claimed:
            return None
        try:
            name = normalise_host(claimed)
        except ValueError:
            return None
        if is_ip(name):
            return name if name == ip_key(ip) else None  # one spelling: ::ffff:a.b.c.d is a.b.c.d
        if name in names_for(ip) or connect_target(name, port) == (ip, port):
            return name
        return None

    return verify
