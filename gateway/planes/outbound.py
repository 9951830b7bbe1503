"""The request that leaves the gateway, built from verified facts (DESIGN §7.1, §7.2, §7.5).

Both data planes use this one preparation, so the bytes an upstream acts on are the bytes the
policy decided on: the target is origin-form, Host / `:authority` is the verified destination,
hop-by-hop and framing headers are dropped and recomputed by the sending side, and a request
whose own authority (absolute-form URI, `:authority`, Host) names anything else is refused with
`authority-mismatch` before a secret is touched. Request size limits and control bytes in header
fields are checked here too, before anything is sent upstream.

Sans-IO: plain strings and bytes in, plain values out; the planes adapt their own types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.config.model import LimitsConfig
from gateway.planes.http.hop import strip_hop_by_hop
from gateway.policy.hosts import normalise_host, split_hostport

AUTHORITY_MISMATCH = "authority-mismatch"
DEFAULT_PORTS = {"http": 80, "https": 443}
# Never copied from the client: Host is ours to set, framing is recomputed per hop, and an
# expectation is answered by the gateway itself.
CLIENT_ONLY = ("host", "content-length", "transfer-encoding", "expect")
_CONTROL = frozenset(b"\0\r\n")


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request refused before policy: status, reason (also the audit reason)."""

    status: int
    reason: str


def authority(host: str, port: int, scheme: str) -> str:
    """`host[:port]` as Host / `:authority`: the port only when it is not the scheme's."""
    name = f"[{host}]" if ":" in host else host
    return name if DEFAULT_PORTS.get(scheme) == port else f"{name}:{port}"


def authority_agrees(claimed: str, host: str, port: int) -> bool:
    """Whether a client's authority names the verified host and port. A missing port is
    allowed (clients omit default ports; the upstream gets our Host anyway); userinfo,
    another port or another name is not."""
    try:
        chost, cport = split_hostport(claimed.strip())
        if normalise_host(chost) != normalise_host(host):
            return False
    except ValueError:
        return False
    return cport is None or cport == port


def check_authority(
    host: str,
    port: int,
    *,
    host_headers: Sequence[str] = (),
    authority_field: str | None = None,
    absolute_form: bool = False,
) -> Rejection | None:
    """Refuse a request whose own authority disagrees with the verified destination:
    an absolute-form target where the destination is fixed by the connection (a tunnel,
    transparent mode, a service), more than one Host, or a Host / `:authority` naming
    another host or port."""
    if absolute_form or len(host_headers) > 1:
        return Rejection(403, AUTHORITY_MISMATCH)
    claims = [*host_headers, *((authority_field,) if authority_field else ())]
    if any(not authority_agrees(c, host, port) for c in claims):
        return Rejection(403, AUTHORITY_MISMATCH)
    return None


def check_limits(
    target: bytes | str, fields: Iterable[tuple[bytes, bytes]], limits: LimitsConfig
) -> Rejection | None:
    """Size limits (414 for the target, 431 for header fields) and control bytes (NUL, CR,
    LF) in a header name or value (400): checked on the bytes as received."""
    if len(target) > limits.url_bytes:
        return Rejection(414, "url-too-long")
    count = total = 0
    for name, value in fields:
        count += 1
        total += len(name) + len(value)
        if not _CONTROL.isdisjoint(name) or not _CONTROL.isdisjoint(value):
            return Rejection(400, "bad-header-bytes")
    if count > limits.headers:
        return Rejection(431, "too-many-headers")
    if total > limits.header_bytes:
        return Rejection(431, "headers-too-large")
    return None


def is_origin_form(target: str) -> bool:
    """An origin-form target (`/path?query`), or `*` (OPTIONS): nothing else names no host."""
    return target.startswith("/") or target == "*"


def outbound_headers(
    headers: Iterable[tuple[str, str]],
    host_value: str | None,
    framing: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The client's end-to-end headers, then Host (if given, first) and the framing the
    sending side will honour; every hop-by-hop, framing and Host field of the client dropped."""
    kept = strip_hop_by_hop(headers, CLIENT_ONLY)
    head = [("Host", host_value)] if host_value else []
    return [*head, *kept, *framing]
