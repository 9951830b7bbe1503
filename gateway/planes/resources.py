"""Process resources: file descriptors and what happens when they run out.

A gateway holds two descriptors per proxied connection (agent side, upstream side), so the
common soft limit of 1,024 ends at ~500 connections; the hard limit is usually far higher and
raising the soft limit to it needs no privilege. When descriptors do run out, every failed
`accept()` used to log a traceback (hundreds of thousands per minute): they are counted and
logged at most once per second instead.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("keyward")


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped by fs.nr_open); (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError):
            pass
    return soft, soft


class AcceptErrorLimiter:
    """An event loop exception handler: failed accepts are counted and logged once per second
    with the count and the cause; anything else goes to the loop's default handler."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.count = 0
        self.total = 0
        self._last = 0.0
        self._cause = ""

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "accept" not in message.lower():
            loop.default_exception_handler(context)
            return
        exc = context.get("exception")
        self.count += 1
        self.total += 1
        self._cause = getattr(exc, "strerror", None) or type(exc).__name__ if exc else message
        now = time.monotonic()
        if now - self._last >= self.interval:
            log.error(
                "accepting connections failed %d time(s) (%s); raise the fd limit (ulimit -n)"
                " or lower limits.max_connections",
                self.count,
                self._cause,
            )
            self._last, self.count = now, 0

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> AcceptErrorLimiter:
        (loop or asyncio.get_running_loop()).set_exception_handler(self)
        return self
