"""Turn an allowed decision's plan into header writes: where secret values meet requests."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from gateway.errors import NotAllowedError
from gateway.policy.core import Decision, Placeholder, basic_credentials

Resolver = Callable[[str], str]


def no_secret(name: str) -> str:
    """The resolver for a request that may not read any secret."""
    raise NotAllowedError(f"no secret may be read for this request ({name})")


def apply_plan(
    decision: Decision, headers: list[tuple[str, str]], resolve: Resolver
) -> list[tuple[str, str]]:
    """Return new headers with the plan written in.

    Agent-supplied headers of the same names are removed (case-insensitively, all duplicates)
    before ours are appended; placeholders are swapped for real values in header values (those
    with `header` in `swap_in`) and inside `Authorization: Basic` blobs (`basic`).
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
        out = [(k, _swap_header(decision, k, v, resolve)) for k, v in out]
    for write in plan.headers:
        value = write.template.render(resolve)
        if write.basic_user is not None:
            user = write.basic_user.render(resolve)
            value = "Basic " + base64.b64encode(f"{user}:{value}".encode()).decode("ascii")
        out.append((write.name, value))
    return out


def swap_placeholders(decision: Decision, text: str, resolve: Resolver, location: str) -> str:
    """Replace every placeholder this decision may swap at `location` (a SWAP_LOCATIONS name)."""
    if not decision.allowed or decision.plan is None:
        raise NotAllowedError(decision.reason)
    for ph in decision.plan.swappable(location):
        if ph.value in text:
            text = text.replace(ph.value, resolve(ph.secret))
    return text


def swap_in_target(decision: Decision, target: str, resolve: Resolver) -> str:
    """The request target with placeholders swapped in its query only (never in the path)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    return path + sep + swap_placeholders(decision, query, resolve, "query")


def _swap_header(decision: Decision, name: str, value: str, resolve: Resolver) -> str:
    value = swap_placeholders(decision, value, resolve, "header")
    if name.lower() == "authorization":
        decoded = basic_credentials(value)
        if decoded is not None:
            swapped = swap_placeholders(decision, decoded, resolve, "basic")
            if swapped != decoded:
                return "Basic " + base64.b64encode(swapped.encode()).decode("ascii")
    return value


_SwapTable = tuple[dict[bytes, Placeholder], re.Pattern[bytes], frozenset[bytes], int]
_last_table: tuple[tuple[Placeholder, ...], _SwapTable] | None = None


def _swap_table(placeholders: tuple[Placeholder, ...]) -> _SwapTable:
    """(placeholder by value, the pattern of every value, their proper prefixes, the longest
    length): the same for every request under one policy, so built once per placeholder set."""
    global _last_table
    last = _last_table
    if last is not None and last[0] is placeholders:
        return last[1]
    by_value = {p.value.encode(): p for p in placeholders}
    values = sorted(by_value, key=len, reverse=True)
    table = (
        by_value,
        re.compile(b"|".join(re.escape(v) for v in values)),
        frozenset(v[:k] for v in values for k in range(1, len(v))),
        len(values[0]) if values else 0,
    )
    _last_table = (placeholders, table)
    return table


class BodySwapper:
    """Placeholders in a streamed request body: swapped for real values where the decision
    allows it (`body` in `swap_in`), otherwise passed unchanged and reported to `unswapped` (the
    request becomes an alert). Holds back only a tail that may be the start of a placeholder,
    so the output equals swapping the whole body at once."""

    def __init__(
        self,
        decision: Decision,
        placeholders: tuple[Placeholder, ...],
        resolve: Resolver,
        unswapped: Callable[[Placeholder], None],
    ) -> None:
        if not decision.allowed or decision.plan is None:
            raise NotAllowedError(decision.reason)
        swappable = decision.plan.swappable("body")
        table = _swap_table(placeholders)
        self._by_value, self._pattern, self._prefixes, self._longest = table
        values = [v for v in (p.value.encode() for p in swappable) if v in self._by_value]
        self._swaps = {v: resolve(self._by_value[v].secret).encode() for v in values}
        self._unswapped = unswapped
        self._held = b""

    @property
    def swaps(self) -> bool:
        """Whether any placeholder may be swapped (the body length may change)."""
        return bool(self._swaps)

    def feed(self, chunk: bytes) -> bytes:
        buf = self._held + chunk if self._held else chunk
        hold = len(buf)
        for k in range(min(self._longest - 1, len(buf)), 0, -1):
            if buf[-k:] in self._prefixes:
                hold = len(buf) - k
                break
        self._held = buf[hold:]
        return self._swap(buf[:hold])

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return self._swap(held)

    def _swap(self, data: bytes) -> bytes:
        if not data or not self._by_value:
            return data
        return self._pattern.sub(self._one, data)

    def _one(self, m: re.Match[bytes]) -> bytes:
        value = m.group(0)
        real = self._swaps.get(value)
        if real is None:
            self._unswapped(self._by_value[value])
            return value
        return real
