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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.config.model import LimitsConfig
from gateway.planes.http.hop import is_hop_by_hop, strip_hop_by_hop
from gateway.policy.core import Decision, Placeholder
from gateway.policy.hosts import normalise_host, split_hostport
from gateway.policy.methods import OVERRIDE_HEADERS
from gateway.reasons import Reason

DEFAULT_PORTS = {"http": 80, "https": 443}
# Never copied from the client: Host is ours to set, framing is recomputed per hop, and an
# expectation is answered by the gateway itself.
CLIENT_ONLY = ("host", "content-length", "transfer-encoding", "expect")
_CONTROL = frozenset(b"\0\r\n")


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request refused before policy: status, reason (also the audit reason)."""

    status: int
    reason: Reason


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
        return Rejection(403, Reason.AUTHORITY_MISMATCH)
    claims = [*host_headers, *((authority_field,) if authority_field else ())]
    if any(not authority_agrees(c, host, port) for c in claims):
        return Rejection(403, Reason.AUTHORITY_MISMATCH)
    return None


def check_limits(
    target: bytes | str, fields: Iterable[tuple[bytes, bytes]], limits: LimitsConfig
) -> Rejection | None:
    """Size limits (414 for the target, 431 for header fields) and control bytes (NUL, CR,
    LF) in a header name or value (400): checked on the bytes as received."""
    if len(target) > limits.url_bytes:
        return Rejection(414, Reason.URL_TOO_LONG)
    count = total = 0
    for name, value in fields:
        count += 1
        total += len(name) + len(value)
        if not _CONTROL.isdisjoint(name) or not _CONTROL.isdisjoint(value):
            return Rejection(400, Reason.BAD_HEADER_BYTES)
    if count > limits.headers:
        return Rejection(431, Reason.TOO_MANY_HEADERS)
    if total > limits.header_bytes:
        return Rejection(431, Reason.HEADERS_TOO_LARGE)
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


# Never forwarded as request trailers (RFC 9110 §6.5.1: framing, routing, authentication,
# request modifiers, content handling, and method overrides): an upstream that merges trailers
# into the head would read them as fields the policy never saw, or over what keyward wrote.
TRAILER_FORBIDDEN = frozenset(
    {
        "host",
        "authorization",
        "cookie",
        "content-length",
        "content-type",
        "content-encoding",
        "content-range",
        "expect",
        "max-forwards",
        "cache-control",
        "pragma",
        "range",
        "if-range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        *OVERRIDE_HEADERS,
    }
)


@dataclass(frozen=True, slots=True)
class TrailerCheck:
    """Request trailers as they may leave: the fields kept, and why the request is an alert."""

    kept: list[tuple[str, str]]
    alerts: list[str]


def request_trailers(
    fields: Iterable[tuple[str, str]],
    decision: Decision,
    placeholders_in: Callable[[str], list[Placeholder]],
    holds_secret: Callable[[str], bool],
) -> TrailerCheck:
    """Trailers arrive after the head was decided and sent: they are never a place to swap a
    placeholder or to carry a field the head could not. Dropped, each with an alert: a field
    named like a framing, routing, credential or method-override header, or one the rule
    writes; a placeholder of a secret this host does not use; a real secret value. A placeholder
    of a secret the host uses passes unchanged, with an alert (never swapped: no `swap_in`
    location covers trailers)."""
    plan = decision.plan
    written = {h.name.lower() for h in plan.headers} if plan is not None else set()
    uses = plan.secrets if plan is not None else frozenset()
    kept: list[tuple[str, str]] = []
    alerts: list[str] = []
    for name, value in fields:
        low = name.lower()
        if low in TRAILER_FORBIDDEN or low in written or is_hop_by_hop(low) or low[:1] == ":":
            alerts.append(f"request trailer {low} dropped")
            continue
        seen = placeholders_in(value)
        if any(p.secret not in uses for p in seen):
            alerts.append(f"placeholder-wrong-host in request trailer {low}")
            continue
        rest = value
        for p in seen:
            rest = rest.replace(p.value, "")
        if holds_secret(rest):
            alerts.append(f"secret value in request trailer {low}: dropped")
            continue
        alerts.extend(f"placeholder {p.env} not swapped in request trailer" for p in seen)
        kept.append((name, value))
    return TrailerCheck(kept, alerts)
