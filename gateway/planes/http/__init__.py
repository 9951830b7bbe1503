"""The aiohttp data plane: base-URL services and transparent plain HTTP, one pooled session."""

from gateway.planes.http.hop import HOP_BY_HOP, strip_hop_by_hop
from gateway.planes.http.proxy import (
    HttpPlane,
    NamesFor,
    OriginalDestination,
    OverrideResolver,
    classify_upstream_error,
)

__all__ = [
    "HOP_BY_HOP",
    "HttpPlane",
    "NamesFor",
    "OriginalDestination",
    "OverrideResolver",
    "classify_upstream_error",
    "strip_hop_by_hop",
]
