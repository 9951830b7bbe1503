"""Mint OAuth access tokens for `oauth` secrets, just before a request needs one.

The token endpoint is the one pinned in the config (never a URL from a response), reached over
verified TLS. Concurrent requests for the same secret share one in-flight refresh (a token
endpoint hammered by a burst of requests rate-limits or revokes). A rotated refresh token is
persisted atomically (0600) so a restart does not replay the invalidated one. When no fresh
token can be had the caller gets `TokenUnavailable`; the store itself refuses expired tokens,
so a stale one is never injected.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config.paths import write_atomic
from gateway.credentials.redact import global_redactor
from gateway.credentials.store import OAuthCredentials, SecretStore
from gateway.errors import AddressRefused, TokenUnavailable
from gateway.upstream.connector import Dial, make_connector

log = logging.getLogger("keyward.oauth")

DEFAULT_EXPIRES_IN = 3600.0
# An OAuth error code (RFC 6749 §5.2) is safe to repeat; anything else in a body is not.
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


class TokenMinter:
    """`ensure(names)` makes every named OAuth secret hold an access token that is valid for
    at least its skew; `GatewayContext.prepare_tokens` points here."""

    def __init__(
        self,
        store: SecretStore,
        state_dir: Path,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        dial: Dial | None = None,
        *,
        timeout: float = 30.0,
        failure_backoff: float = 5.0,
        clock: Callable[[], float] | None = None,
        on_mint: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.dir = Path(state_dir) / "oauth"
        # A factory is called on the first token request: loading the roots costs ~70 ms of
        # start-up that a config without OAuth secrets never needs.
        self.ssl_context = ssl_context
        self.dial = dial
        self.timeout = timeout
        self.failure_backoff = failure_backoff
        self.clock = clock if clock is not None else store.clock  # one clock for mint and expiry
        self.on_mint = on_mint  # (secret name, "ok" | "failed"): metrics
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._skew: dict[str, float] = {}
        self._refresh_tokens: dict[str, str] = {}
        self._failed: dict[str, tuple[float, TokenUnavailable]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # token requests sent, for `keyward status` and tests

    # -- public --------------------------------------------------------------------------
    async def ensure(self, names: Iterable[str]) -> None:
        """Mint what is missing or about to expire; raise TokenUnavailable if one cannot be."""
        creds = self.store.oauth()
        wanted = [n for n in dict.fromkeys(names) if n in creds]
        if not wanted:
            return
        results = await asyncio.gather(
            *(self._ensure_one(creds[n]) for n in wanted), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- single flight -------------------------------------------------------------------
    def _fresh(self, cred: OAuthCredentials) -> bool:
        current = self.store.minted(cred.name)
        if current is None:
            return False
        skew = self._skew.get(cred.name, cred.config.skew_seconds)
        return self.clock() < current[1] - skew

    def _usable(self, name: str) -> bool:
        current = self.store.minted(name)
        return current is not None and self.clock() < current[1]

    async def _ensure_one(self, cred: OAuthCredentials) -> None:
        if self._fresh(cred):
            return
        failed = self._failed.get(cred.name)
        if failed is not None and self.clock() < failed[0] + self.failure_backoff:
            if self._usable(cred.name):
                return
            raise failed[1]
        fut = self._inflight.get(cred.name)
        if fut is None:
            fut = asyncio.ensure_future(self._refresh(cred))
            self._inflight[cred.name] = fut
            fut.add_done_callback(functools.partial(self._done, cred.name))
        # One caller giving up (a client disconnect) must not cancel everyone's refresh.
        await asyncio.shield(fut)

    def _done(self, name: str, fut: asyncio.Future[None]) -> None:
        if self._inflight.get(name) is fut:
            del self._inflight[name]
        if not fut.cancelled():
            fut.exception()  # retrieved here so an unawaited failure does not warn

    async def _refresh(self, cred: OAuthCredentials) -> None:
        try:
            await self._mint(cred)
        except TokenUnavailable as e:
            if self.on_mint is not None:
                self.on_mint(cred.name, "failed")
            self._failed[cred.name] = (self.clock(), e)
            if self._usable(cred.name):
                # Still valid, only inside the skew window: keep using it, retry later.
                log.warning(
                    "oauth %s: refresh failed (%s); current token still valid", cred.name, e.reason
                )
                return
            log.warning("oauth %s: %s", cred.name, e.reason)
            raise
        if self.on_mint is not None:
            self.on_mint(cred.name, "ok")
        self._failed.pop(cred.name, None)

    # -- the token request ---------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_context = self.ssl_context
            if callable(ssl_context):
                ssl_context = ssl_context()
            connector = make_connector(self.dial, ssl_context, limit=16)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    def _form(self, cred: OAuthCredentials) -> dict[str, str]:
        cfg = cred.config
        form = {"grant_type": cfg.grant, "client_id": cred.client_id.reveal()}
        if cred.client_secret is not None:
            form["client_secret"] = cred.client_secret.reveal()
        if cfg.grant == "refresh_token":
            form["refresh_token"] = self._refresh_token(cred)
        elif cfg.scopes:
            form["scope"] = " ".join(cfg.scopes)
        return form

    async def _mint(self, cred: OAuthCredentials) -> None:
        name, url = cred.name, cred.config.token_url
        if not url.startswith("https://"):  # the config model checks too; never send over http
            raise TokenUnavailable(name, "token_url is not https")
        self.requests += 1
        started = self.clock()
        try:
            async with self._client().post(
                url,
                data=self._form(cred),
                headers={"Accept": "application/json"},
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except AddressRefused as e:
            raise TokenUnavailable(name, f"token endpoint {e.reason} ({e.category})") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TokenUnavailable(
                name, f"token endpoint unreachable ({type(e).__name__})"
            ) from None
        payload = _json_object(raw)
        if status != 200:
            code = payload.get("error") if payload else None
            detail = f" ({code})" if isinstance(code, str) and _ERROR_CODE.match(code) else ""
            raise TokenUnavailable(name, f"token endpoint answered {status}{detail}")
        if payload is None:
            raise TokenUnavailable(name, "token endpoint answered something other than JSON")
        token = payload.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenUnavailable(name, "token response has no access_token")
        expires_in = _expires_in(payload.get("expires_in"))
        if expires_in is None:
            raise TokenUnavailable(name, "token response has a bad expires_in")
        rotated = payload.get("refresh_token")
        if cred.config.grant == "refresh_token" and isinstance(rotated, str) and rotated:
            self._remember_refresh(cred, rotated)
        # A token shorter-lived than twice the skew would be "stale" the moment it arrives.
        self._skew[name] = min(cred.config.skew_seconds, expires_in / 2)
        self.store.set_minted(name, token, started + expires_in)
        log.info("oauth %s: minted an access token valid for %ds", name, int(expires_in))

    # -- refresh-token persistence -------------------------------------------------------
    def _state_file(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _refresh_token(self, cred: OAuthCredentials) -> str:
        """The newest refresh token: rotated in memory, else persisted, else the config's."""
        cached = self._refresh_tokens.get(cred.name)
        if cached is not None:
            return cached
        assert cred.refresh_token is not None  # the config model requires it for this grant
        configured = cred.refresh_token.reveal()
        token = self._load_persisted(cred.name, configured) or configured
        self._refresh_tokens[cred.name] = token
        return token

    def _load_persisted(self, name: str, configured: str) -> str | None:
        path = self._state_file(name)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("oauth %s: ignoring unreadable %s", name, path)
            return None
        token = data.get("refresh_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            return None
        if data.get("replaces") != _fingerprint(configured):
            # The configured token changed since we rotated it: the user re-authorised.
            log.info(
                "oauth %s: configured refresh token changed; not using the persisted one", name
            )
            return None
        self._register(token)
        return token

    def _remember_refresh(self, cred: OAuthCredentials, token: str) -> None:
        self._register(token)
        if self._refresh_tokens.get(cred.name) == token:
            return
        self._refresh_tokens[cred.name] = token
        assert cred.refresh_token is not None
        record = {
            "refresh_token": token,
            "replaces": _fingerprint(cred.refresh_token.reveal()),
            "updated": int(self.clock()),
        }
        try:
            path = self._state_file(cred.name)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(path, json.dumps(record).encode(), 0o600)
        except OSError as e:
            log.warning(
                "oauth %s: could not persist the rotated refresh token (%s)",
                cred.name,
                type(e).__name__,
            )

    def _register(self, value: str) -> None:
        self.store.redactor.add(value)
        global_redactor().add(value)


def _fingerprint(value: str) -> str:
    """Which configured token a persisted one replaced (a truncated hash, not the value)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _expires_in(value: object) -> float | None:
    if value is None:
        return DEFAULT_EXPIRES_IN
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    return None
