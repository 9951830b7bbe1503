"""Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy drops them
both ways instead of forwarding a peer's framing or upgrade wishes to the other side."""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names listed in `Connection` (they are hop-by-hop for this message too)."""
    out: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            out.update(t.strip().lower() for t in value.split(",") if t.strip())
    return out


def is_hop_by_hop(name: str, listed: set[str] | frozenset[str] = frozenset()) -> bool:
    low = name.lower()
    return low in HOP_BY_HOP or low.startswith("proxy-") or low in listed


def strip_hop_by_hop(
    headers: Iterable[tuple[str, str]], also: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers, those named in `Connection`, and any names in `also` (each
    name lowered once: this runs on every request and response of both planes)."""
    items = list(headers)
    lows = [k.lower() for k, _ in items]
    listed = {a.lower() for a in also}
    for low, (_, value) in zip(lows, items, strict=True):
        if low == "connection":
            listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return [
        item
        for low, item in zip(lows, items, strict=True)
        if not (low in HOP_BY_HOP or low.startswith("proxy-") or low in listed)
    ]
