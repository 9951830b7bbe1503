"""Hot reload: a new config and new secrets without a restart.

Everything is loaded and compiled off the event loop first; only a complete, valid result
replaces the running one, in a single step on the loop. New requests decide under the new
policy; requests already decided keep their decision (and record the hash of the policy that
made it). An invalid config, or a secret that no longer loads, keeps the running policy and logs
one error line naming `file:line`. Triggers: a change to the config, its `.env` or a `file:`
secret (polled), SIGHUP (`keyward serve`) and `keyward reload` (the control socket).

Not reloaded (a restart applies them): listening ports (`services:`), `upstream.ca_bundle`,
`audit.path`, and the OAuth minter's credentials.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config.compile import build_policy
from gateway.config.loader import LoadedConfig, load_config
from gateway.credentials.placeholders import load_seed
from gateway.credentials.sources import load_secrets, secret_files
from gateway.credentials.store import SecretStore
from gateway.errors import KeywardError
from gateway.planes.context import GatewayContext
from gateway.policy.core import Placeholder, Policy
from gateway.runtime.assemble import build_placeholders
from gateway.upstream.routes import Routes

log = logging.getLogger("keyward.reload")


@dataclass(frozen=True)
class _Loaded:
    config: LoadedConfig
    secrets: SecretStore
    placeholders: tuple[Placeholder, ...]
    policy: Policy


def _load(ctx: GatewayContext, environ: dict[str, str] | None) -> _Loaded:
    loaded = load_config(ctx.config.path)
    # the running redactor keeps scrubbing old values that in-flight responses may still echo
    store = load_secrets(
        loaded.config.secrets,
        config_dir=loaded.base_dir,
        environ=environ,
        redactor=ctx.secrets.redactor,
    )
    placeholders = build_placeholders(loaded, store, load_seed(ctx.state_dir))
    return _Loaded(loaded, store, placeholders, build_policy(loaded.config, placeholders))


def watched_files(loaded: LoadedConfig) -> list[Path]:
    return [
        loaded.path,
        loaded.base_dir / ".env",
        *secret_files(loaded.config.secrets, loaded.base_dir).values(),
    ]


def _stamp(paths: list[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class Reloader:
    """One reload at a time; `watch()` polls the files for changes."""

    def __init__(self, ctx: GatewayContext, environ: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.environ = environ
        self._lock = asyncio.Lock()
        self._paths = watched_files(ctx.config)
        self._stamp = _stamp(self._paths)
        self.reloads = 0
        # called after each swap: components that hold the policy themselves (DNS)
        self.on_reload: list[Callable[[GatewayContext], None]] = []

    async def reload(self) -> bool:
        """Load, validate, swap. False (and the running policy kept) on any error."""
        async with self._lock:
            self._stamp = _stamp(self._paths)
            try:
                new = await asyncio.to_thread(_load, self.ctx, self.environ)
            except KeywardError as e:
                lines = str(e).splitlines()
                more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
                log.error(
                    "reload refused, keeping policy %s: %s%s",
                    self.ctx.config.digest,
                    lines[0] if lines else e,
                    more,
                )
                return False
            ctx = self.ctx
            # one step on the loop: nothing sees half of it
            old_digest = ctx.config.digest
            ctx.config = new.config
            ctx.secrets = new.secrets
            ctx.placeholders = new.placeholders
            ctx.routes = Routes.from_config(new.config.config.upstream)
            ctx.policy = new.policy
            ctx.__dict__.pop("oauth_names", None)  # cached per store
            ctx.audit.reopen()
            self._paths = watched_files(new.config)
            self._stamp = _stamp(self._paths)
            self.reloads += 1
            for hook in self.on_reload:
                hook(ctx)
            log.warning(
                "reloaded %s: policy %s -> %s", ctx.config.path, old_digest, ctx.config.digest
            )
            return True

    async def watch(self, interval: float = 1.0) -> None:
        """Reload whenever a watched file changes (mtime, size or inode)."""
        while True:
            await asyncio.sleep(interval)
            if _stamp(self._paths) != self._stamp:
                await self.reload()
