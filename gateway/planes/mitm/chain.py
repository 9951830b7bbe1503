"""keyward's mitm addons as one mitmproxy addon.

For every event (and, after each flow event, an `update`) mitmproxy visits every addon in its
chain, whether or not it has the hook: a context manager, a coroutine, two generators and a
failed attribute lookup per addon. With a dozen keyward addons that was a tenth of a request's
time on the mitm plane. `AddonChain` is one addon with exactly the hooks its addons have, each
calling only the addons that have it, in chain order, each guarded as mitmproxy guards an addon
(an error is logged and the next addon still runs; `AddonHalt` stops the chain).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import safecall

_Hook = Callable[..., Any]


def _name(addon: Any) -> str:
    """What mitmproxy would register the addon under (`AddonManager.get`)."""
    return str(getattr(addon, "name", type(addon).__name__.lower()))


def _sync(handlers: list[_Hook]) -> _Hook:
    def dispatch(*args: Any) -> None:
        for handler in handlers:
            try:
                handler(*args)
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception:
                with safecall():  # logged exactly as mitmproxy logs an addon's error
                    raise

    return dispatch


def _async(handlers: list[_Hook]) -> Callable[..., Awaitable[None]]:
    async def dispatch(*args: Any) -> None:
        for handler in handlers:
            try:
                res = handler(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception:
                with safecall():
                    raise

    return dispatch


class AddonChain:
    """Addons behind one mitmproxy addon (they are not registered with mitmproxy themselves:
    look them up with `get`). Hooks are those mitmproxy knows when the chain is built."""

    name = "keyward"

    def __init__(self, addons: Iterable[Any]) -> None:
        self.chain = list(addons)
        self._by_name = {_name(a): a for a in self.chain}
        for hook in hooks.all_hooks:
            handlers = [h for a in self.chain if callable(h := getattr(a, hook, None))]
            if not handlers:
                continue
            is_async = any(inspect.iscoroutinefunction(h) for h in handlers)
            setattr(self, hook, _async(handlers) if is_async else _sync(handlers))

    def get(self, name: str) -> Any | None:
        """An addon of the chain by its mitmproxy name (lowercase class name)."""
        return self._by_name.get(name)
