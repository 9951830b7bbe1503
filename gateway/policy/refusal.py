"""What a refused request is answered with, on every plane (DESIGN §7.8).

An agent (often an LLM) that is refused must be able to tell its user what was refused, by which
rule, and what an operator would change: one plain paragraph, then the exact `keyward.yaml` lines.
JSON when the client asks for it. Pure functions: no I/O, no secret, nothing from the request but
its method, destination and path (the query is dropped: it may carry tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum

from gateway.policy.core import Decision, RequestFacts
from gateway.reasons import AnyReason, Reason


class RefusalMode(StrEnum):
    EXPLAIN = "explain"  # complete a denied CONNECT and answer each request with an explanation
    RESET = "reset"  # refuse a denied CONNECT with a bare 403; short JSON bodies


REASON_HEADER = "X-Keyward-Reason"
_BARE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


def _yaml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _rule_key(host: str, port: int, scheme: str) -> str:
    """The narrowest rule an operator would write for this destination."""
    default = 80 if scheme in ("http", "ws") else 443
    if ":" in host:  # IPv6 literal
        return host
    return host if port in (default, 443, 80) else f"{host}:{port}"


def _hosts_snippet(key: str, body: str) -> str:
    return f"egress:\n  hosts:\n    {_yaml_key(key)}: {body}\n"


# The refusals of a form body read to find the method it names (`_check_path_rules`).
_FORM_REASONS = frozenset(
    {
        Reason.FORM_BODY_ENCODED,
        Reason.FORM_LENGTH_REQUIRED,
        Reason.FORM_TOO_LARGE,
        Reason.FORM_BODY_PENDING,
        Reason.AMBIGUOUS_FORM,
    }
)


def _advice(decision: Decision, facts: RequestFacts) -> tuple[str, str, str]:
    """(why, what the operator could do, yaml lines or "")."""
    reason, kind = decision.reason, decision.reason.kind
    rule = decision.rule
    where = f"the rule {rule!r}" if rule else "egress.default: deny (no rule matched)"
    if kind is Reason.NO_RULE:
        key = _rule_key(facts.host, facts.port, facts.scheme)
        return (
            f"no rule in keyward.yaml matches {facts.host} and egress.default is deny",
            "If this destination should be reachable, an operator can add these lines to "
            "keyward.yaml (merge them into the existing egress.hosts) and restart keyward",
            _hosts_snippet(key, "{}"),
        )
    if kind is Reason.HOST_DENIED:
        return (
            f"the rule {rule!r} in keyward.yaml says allow: false",
            "If this destination should be reachable, an operator can replace that rule with",
            _hosts_snippet(rule or facts.host, "{}"),
        )
    if kind is Reason.PATH_DENIED:
        entry = reason.detail
        return (
            f"the rule {rule!r} in keyward.yaml denies {entry!r}",
            f"If this request should be allowed, an operator can remove {entry!r} from the "
            f"deny: list of that rule",
            "",
        )
    if kind is Reason.PLAIN_HTTP_CREDENTIALS:
        return (
            f"the rule {rule!r} writes credentials and this request is plain HTTP, which would "
            "expose them on the wire",
            "Use https://; or, only for a trusted network, an operator can add plain_http: true "
            "to that rule",
            _hosts_snippet(rule or facts.host, "{ plain_http: true }  # add to the existing rule"),
        )
    if kind is Reason.PLACEHOLDER_WRONG_HOST:
        env = reason.detail or "a placeholder variable"
        return (
            f"the request carried the placeholder value of {env}, which keyward only exchanges "
            f"for a real credential on the hosts whose rule uses it, and {facts.host} is not one",
            f"Remove {env} from this request; sending it elsewhere is treated as an attempt to "
            "leak the credential",
            "",
        )
    if kind is Reason.PRIVATE_ADDRESS:
        return (
            f"{facts.host} resolved to a loopback, private, link-local (metadata) or otherwise "
            "special address, and no rule names that address",
            "If this host really is internal and should be reachable, an operator can add "
            "private_addresses: allow to that rule (or a rule naming the address, IP or CIDR)",
            _hosts_snippet(
                rule or facts.host, "{ private_addresses: allow }  # add to the existing rule"
            ),
        )
    if kind is Reason.AMBIGUOUS_PATH:
        kinds = reason.detail
        return (
            f"the path holds a form that servers decode differently ({kinds}), and the rule "
            f"{rule!r} has deny: path rules that such a form could dodge",
            "Send the path in plain form (no %2F, %5C, \\, ;, %25, bad escapes or controls); or, "
            "if the upstream reads these forms the way keyward does, an operator can add "
            "ambiguous_paths: allow to that rule",
            _hosts_snippet(rule or facts.host, "{ ambiguous_paths: allow }  # add to the rule"),
        )
    if kind in _FORM_REASONS:
        return (
            f"the rule {rule!r} denies some method on this path, and a form body can name another "
            "method (_method), so keyward reads it before deciding: it must be sent with a "
            "Content-Length of at most 64 KiB, uncompressed, and be well-formed",
            "Send the form with a Content-Length, uncompressed; or send JSON",
            "",
        )
    if kind in (Reason.BAD_METHOD, Reason.BAD_TARGET):
        what = "method" if kind is Reason.BAD_METHOD else "request target"
        return (
            f"the {what} is not valid HTTP (whitespace or control characters), and an upstream "
            "could read it as a different request",
            "Send a valid request; no configuration change allows this",
            "",
        )
    if kind in (Reason.HOST_MISMATCH, Reason.SNI_MISMATCH):
        what = "Host header" if kind is Reason.HOST_MISMATCH else "TLS server name (SNI)"
        return (
            f"the request's {what} names a different host than the connection's destination "
            f"({facts.host}:{facts.port})",
            "Send the request to the host it names; no configuration change allows this",
            "",
        )
    return (
        f"{reason} (decided by {where})",
        "No configuration change is suggested for this reason",
        "",
    )


def explain(decision: Decision, facts: RequestFacts) -> tuple[str, str]:
    """(one plain paragraph, yaml lines or "")."""
    path = facts.path.split("?", 1)[0].split("#", 1)[0] or "/"
    why, todo, lines = _advice(decision, facts)
    by = f"rule {decision.rule!r}" if decision.rule else "egress.default: deny"
    paragraph = (
        f"keyward refused this request: {facts.method} {facts.scheme}://{facts.host}:{facts.port}"
        f"{path} (host {facts.host}, port {facts.port}, method {facts.method}, path {path}), "
        f"decided by {by}, reason {decision.reason}: {why}. Nothing was sent to {facts.host}; "
        f"retrying will not help. {todo}{':' if lines else '.'}"
    )
    return paragraph, lines


def wants_json(accept: str | None) -> bool:
    return bool(accept) and "json" in accept.lower()  # type: ignore[union-attr]


def refusal(
    decision: Decision,
    facts: RequestFacts,
    *,
    mode: RefusalMode | str = RefusalMode.EXPLAIN,
    accept: str | None = None,
    status: int | None = None,
) -> Refusal:
    """The response to a denied request, the same on every plane (status: the decision's)."""
    status = decision.status if status is None else status
    headers: tuple[tuple[str, str], ...] = (
        (REASON_HEADER, _header_safe(decision.reason)),
        ("X-Content-Type-Options", "nosniff"),
    )
    base = {"error": "denied by keyward", "reason": decision.reason, "rule": decision.rule}
    if RefusalMode(mode) is RefusalMode.RESET:
        return Refusal(status, "application/json", json.dumps(base).encode(), headers)
    paragraph, lines = explain(decision, facts)
    if wants_json(accept):
        path = facts.path.split("?", 1)[0].split("#", 1)[0] or "/"
        body = {
            **base,
            "refused": {
                "method": facts.method,
                "scheme": facts.scheme,
                "host": facts.host,
                "port": facts.port,
                "path": path,
            },
            "decided_by": decision.rule or "egress.default",
            "explanation": paragraph,
            "config": lines or None,
        }
        return Refusal(status, "application/json", json.dumps(body).encode(), headers)
    text = paragraph + "\n" + ("\n" + lines if lines else "")
    return Refusal(status, "text/plain; charset=utf-8", text.encode(), headers)


def unavailable(reason: AnyReason, detail: str, retry_after: int = 1) -> Refusal:
    """The response to a request keyward turns away for its own state, not for the policy (a
    connection over `limits.max_connections`): a 503 worth retrying, JSON, whatever the mode."""
    body = {"error": "keyward cannot take this request now", "reason": reason, "detail": detail}
    headers = (
        (REASON_HEADER, _header_safe(reason)),
        ("Retry-After", str(retry_after)),
        ("X-Content-Type-Options", "nosniff"),
    )
    return Refusal(503, "application/json", json.dumps(body).encode(), headers)


def _header_safe(value: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in value)
