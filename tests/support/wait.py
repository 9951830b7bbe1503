"""Waiting for something to happen without timing it: poll a condition until it holds.

The bound only catches a hang (the condition never comes true) and fails with what was awaited;
it is generous because the CI machine is loaded, and passing never depends on it being short.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

BOUND = 30.0  # seconds: only a hang takes this long


def wait_until(pred: Callable[[], T], *, what: str, timeout: float = BOUND) -> T:
    """Poll `pred` until it returns something truthy and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s for {what}")
        time.sleep(0.02)
    return got


async def async_wait_until(pred: Callable[[], T], *, what: str, timeout: float = BOUND) -> T:
    """`wait_until` for a test running on the event loop (the loop keeps serving meanwhile)."""
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s for {what}")
        await asyncio.sleep(0.02)
    return got
