"""OAuth minting against a real HTTPS token endpoint (test CA), counting every token request."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from gateway.config.loader import load_config
from gateway.credentials.oauth import TokenMinter
from gateway.credentials.redact import global_redactor
from gateway.credentials.sources import load_secrets
from gateway.credentials.store import SecretStore
from gateway.errors import StaleTokenError, TokenUnavailable
from tests.support.pki import TestCA, make_ca

CLIENT_ID = "client-id-7781.apps.example"
CLIENT_SECRET = "cs-Q2hvY29sYXRlIGNha2U-77"
REFRESH = "rt-initial-1f2e3d4c5b6a7988"

CONFIG = """version: 1
secrets:
  g:
    oauth:
      token_url: https://auth.example.test/token
      grant: refresh_token
      client_id: { env: CID }
      client_secret: { env: CSECRET }
      refresh_token: { env: RTOKEN }
      skew_seconds: 1
  cc:
    oauth:
      token_url: https://auth.example.test/token
      grant: client_credentials
      client_id: { env: CID }
      client_secret: { env: CSECRET }
      scopes: [read, write]
"""


@dataclass
class TokenServer:
    """A token endpoint that rotates refresh tokens like Google/Microsoft do when asked."""

    port: int = 0
    runner: web.AppRunner | None = None
    mode: str = "ok"  # ok | 500 | badjson | redirect
    expires_in: float | None = 3600
    rotate: bool = False
    delay: float = 0.05
    valid_refresh: set[str] = field(default_factory=lambda: {REFRESH})
    forms: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        await asyncio.sleep(self.delay)
        if self.mode == "500":
            return web.json_response({"error": "server_error"}, status=500)
        if self.mode == "badjson":
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if self.mode == "redirect":
            raise web.HTTPFound("https://evil.example.test/token")
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        n = len(self.forms)
        body: dict[str, object] = {"token_type": "Bearer"}
        if form["grant_type"] == "refresh_token":
            if form.get("refresh_token") not in self.valid_refresh:
                return web.json_response({"error": "invalid_grant"}, status=400)
            if self.rotate:
                new = f"rt-rotated-{n}-{secrets.token_hex(8)}"
                self.valid_refresh = {new}
                body["refresh_token"] = new
        elif form["grant_type"] != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"ya29.minted-{n}-{secrets.token_hex(12)}"
        self.issued.append(token)
        body["access_token"] = token
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)

    async def start(self, ssl_context: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_post("/token", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=ssl_context)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class Clock:
    """A wall clock the test moves by hand, so expiry does not depend on how busy the machine is."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class World:
    dir: Path
    ca: TestCA
    server: TokenServer
    config: Path
    minters: list[TokenMinter] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)

    def store(self, refresh: str = REFRESH) -> SecretStore:
        loaded = load_config(self.config)
        environ = {"CID": CLIENT_ID, "CSECRET": CLIENT_SECRET, "RTOKEN": refresh}
        store = load_secrets(loaded.config.secrets, config_dir=self.dir, environ=environ)
        store.clock = self.clock
        return store

    def minter(self, store: SecretStore, **kw: object) -> TokenMinter:
        port = self.server.port

        async def dial(host: str, p: int) -> list[tuple[str, int]]:
            """The operator's `upstream.resolve` for the token host (exempt from the guard)."""
            assert (host, p) == ("auth.example.test", 443)
            return [("127.0.0.1", port)]

        trust = ssl.create_default_context(cafile=str(self.ca.path))
        m = TokenMinter(store, self.dir / "state", trust, dial=dial, **kw)  # type: ignore[arg-type]
        self.minters.append(m)
        return m


async def _at(target: tuple[str, int]) -> list[tuple[str, int]]:
    return [target]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ca = make_ca(tmp_path / "pki")
    server = TokenServer()
    await server.start(ca.server_context(tmp_path / "pki", "auth.example.test"))
    config = tmp_path / "keyward.yaml"
    config.write_text(CONFIG)
    w = World(tmp_path, ca, server, config)
    yield w
    for m in w.minters:
        await m.close()
    await server.stop()


async def test_refresh_token_grant(world: World) -> None:
    store = world.store()
    with pytest.raises(StaleTokenError):
        store.resolve("g")  # nothing minted yet: refused, never empty
    await world.minter(store).ensure(frozenset({"g"}))
    assert world.server.forms == [
        {
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "refresh_token": REFRESH,
        }
    ]
    assert store.resolve("g") == world.server.issued[-1]
    # every minted value is redacted from now on
    assert store.redactor.redact(f"x {world.server.issued[-1]} y") == "x [REDACTED] y"
    assert global_redactor().redact(world.server.issued[-1]) == "[REDACTED]"


async def test_client_credentials_grant_with_scope(world: World) -> None:
    store = world.store()
    await world.minter(store).ensure(frozenset({"cc", "not-oauth"}))
    assert world.server.forms == [
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": "read write",
        }
    ]
    assert store.resolve("cc") == world.server.issued[-1]


async def test_concurrent_callers_share_one_refresh(world: World) -> None:
    world.server.delay = 0.2
    store = world.store()
    minter = world.minter(store)
    await asyncio.gather(*(minter.ensure(frozenset({"g"})) for _ in range(50)))
    assert len(world.server.forms) == 1
    assert minter.requests == 1
    assert store.resolve("g") == world.server.issued[0]


async def test_concurrent_callers_share_one_failure(world: World) -> None:
    world.server.mode = "500"
    world.server.delay = 0.2
    minter = world.minter(world.store())
    results = await asyncio.gather(
        *(minter.ensure(frozenset({"g"})) for _ in range(50)), return_exceptions=True
    )
    assert len(world.server.forms) == 1
    assert all(isinstance(r, TokenUnavailable) for r in results)
    assert "answered 500 (server_error)" in str(results[0])


async def test_cached_until_expiry_minus_skew_then_refreshed(world: World) -> None:
    world.server.expires_in = 2.5  # config skew is 1 s: fresh for ~1.5 s
    store = world.store()
    minter = world.minter(store)
    await minter.ensure(frozenset({"g"}))
    first = store.resolve("g")
    for _ in range(5):
        await minter.ensure(frozenset({"g"}))
    assert len(world.server.forms) == 1
    world.clock.advance(1.6)
    assert store.resolve("g") == first  # inside the skew window: still valid...
    await minter.ensure(frozenset({"g"}))  # ...but refreshed before it can expire
    assert len(world.server.forms) == 2
    assert store.resolve("g") == world.server.issued[-1] != first


async def test_rotated_refresh_token_persisted_0600_and_used_after_restart(world: World) -> None:
    world.server.rotate = True
    store = world.store()
    await world.minter(store).ensure(frozenset({"g"}))
    rotated = next(iter(world.server.valid_refresh))
    assert rotated != REFRESH  # the configured one is now invalid at the endpoint
    path = world.dir / "state" / "oauth" / "g.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["refresh_token"] == rotated
    assert not list(path.parent.glob(".*tmp"))  # atomic: no temp file left behind
    assert store.redactor.redact(rotated) == "[REDACTED]"

    # restart: a new store (config still holds the old token) and a new minter
    store2 = world.store()
    await world.minter(store2).ensure(frozenset({"g"}))
    assert world.server.forms[-1]["refresh_token"] == rotated
    assert store2.resolve("g") == world.server.issued[-1]
    assert store2.redactor.redact(rotated) == "[REDACTED]"


async def test_persisted_token_ignored_when_config_token_changed(world: World) -> None:
    world.server.rotate = True
    await world.minter(world.store()).ensure(frozenset({"g"}))
    # the user re-authorised: a new configured refresh token the endpoint accepts
    world.server.valid_refresh = {"rt-reauthorised-9a8b7c6d5e"}
    store = world.store(refresh="rt-reauthorised-9a8b7c6d5e")
    await world.minter(store).ensure(frozenset({"g"}))
    assert world.server.forms[-1]["refresh_token"] == "rt-reauthorised-9a8b7c6d5e"


@pytest.mark.parametrize("failure", ["down", "500", "badjson", "redirect"])
async def test_endpoint_failure_never_leaves_an_expired_token_usable(
    world: World, failure: str
) -> None:
    world.server.expires_in = 1
    store = world.store()
    minter = world.minter(store, failure_backoff=0.0)
    await minter.ensure(frozenset({"g"}))
    old = store.resolve("g")
    if failure == "down":
        await world.server.stop()
    else:
        world.server.mode = failure
    world.clock.advance(1.1)  # the token has now expired
    with pytest.raises(TokenUnavailable) as info:
        await minter.ensure(frozenset({"g"}))
    with pytest.raises(StaleTokenError):
        store.resolve("g")
    text = f"{info.value} {info.value!r}"
    for value in (old, REFRESH, CLIENT_SECRET):
        assert value not in text
    expected = {
        "down": "token endpoint unreachable",
        "500": "token endpoint answered 500",
        "badjson": "other than JSON",
        "redirect": "token endpoint answered 302",
    }[failure]
    assert expected in str(info.value)


async def test_failed_refresh_keeps_a_still_valid_token(world: World) -> None:
    world.server.expires_in = 3  # skew 1 s: refresh due after 2 s, expiry after 3 s
    store = world.store()
    minter = world.minter(store, failure_backoff=0.0)
    await minter.ensure(frozenset({"g"}))
    token = store.resolve("g")
    world.server.mode = "500"
    world.clock.advance(2.1)
    await minter.ensure(frozenset({"g"}))  # refresh failed, but the token has not expired
    assert store.resolve("g") == token
    assert len(world.server.forms) == 2


async def test_untrusted_token_endpoint_is_refused(world: World) -> None:
    store = world.store()
    untrusted = TokenMinter(
        store,
        world.dir / "state",
        ssl.create_default_context(),  # system roots only: the test CA is unknown
        dial=lambda h, p: _at(("127.0.0.1", world.server.port)),
    )
    world.minters.append(untrusted)
    with pytest.raises(TokenUnavailable, match="unreachable"):
        await untrusted.ensure(frozenset({"g"}))
    assert world.server.forms == []  # the form (with the client secret) was never sent


async def test_minted_token_never_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    world.server.rotate = True
    world.server.expires_in = 1
    store = world.store()
    minter = world.minter(store, failure_backoff=0.0)
    await minter.ensure(frozenset({"g", "cc"}))
    world.server.mode = "500"
    world.clock.advance(1.1)
    with pytest.raises(TokenUnavailable) as info:
        await minter.ensure(frozenset({"g"}))
    assert "oauth g" in caplog.text  # it did log, just not values
    secrets_seen = [*world.server.issued, *world.server.valid_refresh, REFRESH, CLIENT_SECRET]
    for value in secrets_seen:
        assert value not in caplog.text
        assert value not in str(info.value)
