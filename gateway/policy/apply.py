"""Turn an allowed decision's plan into header writes: where secret values meet requests."""

from __future__ import annotations

import base64
from collections.abc import Callable

from gateway.policy.core import Decision

Resolver = Callable[[str], str]


class NotAllowedError(PermissionError):
    """Raised when a plan is applied for a decision that denied the request."""


def apply_plan(
    decision: Decision, headers: list[tuple[str, str]], resolve: Resolver
) -> list[tuple[str, str]]:
    """Return new headers with the plan written in.

    Agent-supplied headers of the same names are removed (case-insensitively, all duplicates)
    before ours are appended; placeholder values in any header are swapped for real ones.
    `resolve` is called only here, and only after the decision is checked.
    """
    if not decision.allowed or decision.plan is None:
        raise NotAllowedError(decision.reason)
    plan = decision.plan
    if not plan.headers and not plan.swaps:
        return headers
    replaced = {h.name.lower() for h in plan.headers}
    out = [(k, v) for k, v in headers if k.lower() not in replaced]
    if plan.swaps:
        out = [(k, swap_placeholders(decision, v, resolve)) for k, v in out]
    for write in plan.headers:
        value = write.template.render(resolve)
        if write.basic_user is not None:
            user = write.basic_user.render(resolve)
            value = "Basic " + base64.b64encode(f"{user}:{value}".encode()).decode("ascii")
        out.append((write.name, value))
    return out


def swap_placeholders(decision: Decision, text: str, resolve: Resolver) -> str:
    """Replace every placeholder this decision may swap (e.g. in a URL or a WebSocket frame)."""
    if not decision.allowed or decision.plan is None:
        raise NotAllowedError(decision.reason)
    for ph in decision.plan.swaps:
        if ph.value in text:
            text = text.replace(ph.value, resolve(ph.secret))
    return text
