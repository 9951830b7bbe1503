"""Stopping both planes the same way in `keyward serve` and `keyward run`: stop accepting, let
requests and streams in flight finish for up to the drain bound, then cut what is left, each
with an audit record (`gateway-stopping`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class Drainable(Protocol):
    async def drain(self, seconds: float) -> None: ...


async def drain_planes(seconds: float, *planes: Drainable | None) -> None:
    """Drain every plane given (None: not started) at once, within one bound."""
    drains = [p.drain(seconds) for p in planes if p is not None]
    with contextlib.suppress(Exception):
        await asyncio.gather(*drains)
