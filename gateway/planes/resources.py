"""Process resources: file descriptors and what happens when they run out.

A gateway holds two descriptors per proxied connection (agent side, upstream side), so the
common soft limit of 1,024 ends at ~500 connections; the hard limit is usually far higher and
raising the soft limit to it needs no privilege. When descriptors do run out, every failed
`accept()` used to log a traceback (hundreds of thousands per minute): they are counted and
logged at most once per second instead. Before that point, `limits.max_connections` turns a
connection away with a 503 while the gateway still has descriptors to answer it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config.model import LimitsConfig

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


# Connections over a limit allowed to wait for their 503 at once, per plane; beyond, closed
# at once (the answer must not cost the descriptors the limit protects).
MAX_WAITING_REFUSALS = 64
# Descriptors kept out of the connection budget: listeners, the audit log, DNS, OAuth, reloads.
FD_RESERVE = 64


def fd_connection_cap() -> int:
    """Connections the fd limit can carry: each holds two descriptors (agent and upstream)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (soft - FD_RESERVE) // 2)


class ConnectionLimiter:
    """Agent connections held at once, all listeners of both planes together, and per client
    address. A connection over a limit is not counted: its plane answers it with a 503 and
    closes it. The limits are read per connection, so a reload applies to new connections."""

    def __init__(self, limits: Callable[[], LimitsConfig], log_interval: float = 1.0) -> None:
        self.limits = limits
        self.total = 0
        self.by_client: dict[str, int] = {}
        self.turned_away = 0  # since start
        self.log_interval = log_interval
        self._unlogged = 0
        self._last_log = -log_interval

    def admit(self, client: str) -> str | None:
        """Count a connection from `client` (an address); None, or why it is over a limit."""
        lim = self.limits()
        cap = min(lim.max_connections, fd_connection_cap())
        held = self.by_client.get(client, 0)
        if self.total >= cap:
            what = "limits.max_connections" if cap == lim.max_connections else "the fd limit"
            return self._refuse(f"{self.total} connections held: {what} ({cap}) reached")
        if held >= lim.max_connections_per_client:
            return self._refuse(
                f"{held} connections held from {client}: limits.max_connections_per_client"
                f" ({lim.max_connections_per_client}) reached"
            )
        self.total += 1
        self.by_client[client] = held + 1
        return None

    def _refuse(self, why: str) -> str:
        """Each refusal is audited by its plane; the log gets one line per second at most."""
        self.turned_away += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            log.warning("turned away %d connection(s) with a 503: %s", self._unlogged, why)
            self._last_log, self._unlogged = now, 0
        return why

    def release(self, client: str) -> None:
        held = self.by_client.get(client, 0)
        if held <= 1:
            self.by_client.pop(client, None)
        else:
            self.by_client[client] = held - 1
        self.total = max(0, self.total - 1)
