"""Pairs on the real engines (Podman and Docker) as users meet them: a name held by something
else, two `up`s racing, restarts, a gateway that is down, `exec -i`, workspace ownership and
the host gateway.

Each engine gets one `Internal: true` network with a fake upstream (as in test_e2e_engines.py);
every test makes its own pair with a unique name and removes it by label. Everything made here
carries `keyward.test=1` and `keyward.pair=<name>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config.loader import load_config
from gateway.credentials.sources import load_secrets
from gateway.engine import pair
from gateway.engine.client import EngineClient
from gateway.engine.errors import NotFound
from gateway.engine.hostnet import forward_drop_problems
from tests.test_e2e_engines import (
    CONFIG,
    REAL_KEY,
    SOCKETS,
    TEST_LABELS,
    _allow_intra_network,
    _cleanup,
    _leftovers,
    _start_upstream,
    require_engine,
)

pytestmark = pytest.mark.engine
T = TypeVar("T")
SLEEPER = ["sh", "-c", "while :; do sleep 1; done"]


@dataclass
class World:
    kind: str
    socket: str
    prefix: str
    network: str
    upstream_ip: str
    base: Path
    names: list[str]

    def run(self, fn: Callable[[EngineClient], Awaitable[T]]) -> T:
        async def go() -> T:
            async with EngineClient(self.socket) as c:
                return await fn(c)

        return asyncio.run(go())

    def new_name(self, what: str) -> str:
        name = f"{self.prefix}-{what}"
        self.names.append(name)
        return name

    def opts(self, name: str, **kw: Any) -> pair.PairOptions:
        labels = {**TEST_LABELS, **kw.pop("labels", {})}
        return pair.PairOptions(name=name, networks=[self.network], labels=labels, **kw)

    def loaded(self) -> tuple[Any, Any]:
        loaded = load_config(self.base / "keyward.yaml")
        store = load_secrets(
            loaded.config.secrets, config_dir=self.base, environ={"E2E_API_KEY": REAL_KEY}
        )
        return loaded, store

    async def up(self, c: EngineClient, name: str, **kw: Any) -> pair.PairInfo:
        loaded, store = self.loaded()
        return await pair.up(c, loaded, store, self.opts(name, **kw))

    def cli(
        self, *argv: str, timeout: float = 180, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", argv[0], "--engine-socket", self.socket, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "E2E_API_KEY": REAL_KEY, **(env or {})},
            **kw,
        )

    def cli_up(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "up", "-c", str(self.base / "keyward.yaml"), "--name", name,
            "--network", self.network, *extra,
        )  # fmt: skip


@pytest.fixture(scope="module", params=["podman", "docker"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:  # fmt: skip
    kind = request.param
    require_engine(kind)
    sock = SOCKETS[kind]
    prefix = f"p{kind[0]}-{secrets.token_hex(3)}"
    base = tmp_path_factory.mktemp(f"pairs-{kind}")
    w = World(kind, sock, prefix, f"keyward-{prefix}-net", "", base, [prefix])
    labels = {**TEST_LABELS, pair.LABEL_PAIR: prefix}
    rule: list[str] | None = None
    try:
        w.run(lambda c: c.network_create(w.network, internal=True, labels=labels))
        subnet = w.run(lambda c: c.network_inspect(w.network))["IPAM"]["Config"][0]["Subnet"]
        rule = _allow_intra_network(kind, subnet, prefix)
        _, ip, ca = w.run(lambda c: _start_upstream(c, prefix, w.network))
        w.upstream_ip = ip
        (base / "upstream-ca.pem").write_bytes(ca)
        (base / "keyward.yaml").write_text(CONFIG.format(ip=ip))
        yield w
    finally:
        for name in reversed(w.names):
            with contextlib.suppress(Exception):
                w.run(lambda c, n=name: _cleanup(c, n))  # type: ignore[misc]
        if rule is not None:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


async def _foreign(c: EngineClient, name: str, image: str) -> str:
    """A user's own container, not labelled as any pair, holding `name`."""
    cid = await c.container_create(
        name,
        {"Image": image, "Cmd": SLEEPER, "Labels": dict(TEST_LABELS),
         "HostConfig": {"NetworkMode": "none"}},
    )  # fmt: skip
    await c.container_start(cid)
    return cid


def _running(w: World, cid: str) -> bool:
    try:
        return bool(w.run(lambda c: c.container_inspect(cid))["State"]["Running"])
    except NotFound:
        return False


# -- 1. ownership ------------------------------------------------------------------------------


def test_foreign_container_name_is_an_error_that_removes_nothing(world: World) -> None:
    name = world.new_name("foreign")
    names = pair.PairNames(name)
    for held in (names.gateway, names.agent):
        foreign = world.run(lambda c, h=held: _foreign(c, h, pair.DEFAULT_AGENT_IMAGE))  # type: ignore[misc]
        try:
            r = world.cli_up(name)
            assert r.returncode == 1, r.stderr
            assert f"not labelled keyward.pair={name}" in r.stderr
            assert "Traceback" not in r.stderr
            assert _running(world, foreign), "keyward removed a container it did not create"
            assert world.run(lambda c: _leftovers(c, name)) == []
            down = world.cli("down", "--name", name)
            assert down.returncode == 0, down.stderr
            assert _running(world, foreign), "down removed a container by name"
        finally:
            world.run(lambda c, f=foreign: c.container_remove(f, force=True))  # type: ignore[misc]


def test_foreign_volume_name_is_an_error_that_removes_nothing(world: World) -> None:
    name = world.new_name("fvol")
    vol = pair.PairNames(name).state_volume
    world.run(lambda c: c.volume_create(vol, labels=dict(TEST_LABELS)))
    try:
        r = world.cli_up(name)
        assert r.returncode == 1, r.stderr
        assert f"volume {vol} exists and is not labelled" in r.stderr
        assert world.run(lambda c: c.volume_inspect(vol))["Name"] == vol
        assert world.run(lambda c: _leftovers(c, name)) == []
    finally:
        world.run(lambda c: c.volume_remove(vol))


def test_concurrent_ups_one_wins_the_other_changes_nothing(world: World) -> None:
    name = world.new_name("race")

    async def race(c: EngineClient) -> list[Any]:
        async with EngineClient(world.socket) as c2:
            return await asyncio.gather(
                world.up(c, name), world.up(c2, name), return_exceptions=True
            )

    results = world.run(race)
    won = [r for r in results if isinstance(r, pair.PairInfo)]
    lost = [r for r in results if not isinstance(r, pair.PairInfo)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], pair.NameHeld), repr(lost[0])
    info = won[0]
    assert _running(world, info.gateway_id) and _running(world, info.agent_id)
    r = world.cli("exec", "--name", name, "--", "curl", "-sS", "-m", "10",
                  "https://api.example.test/v1/race")  # fmt: skip
    assert r.returncode == 0 and "Bearer [REDACTED]" in r.stdout, r.stderr
    # a third `up` is refused the same way and also changes nothing
    again = world.cli_up(name)
    assert again.returncode == 1 and "exists already" in again.stderr
    assert _running(world, info.gateway_id) and _running(world, info.agent_id)
    down = world.cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert world.run(lambda c: _leftovers(c, name)) == []


# -- 2. plain errors ---------------------------------------------------------------------------


def test_forward_drop_on_a_podman_internal_network_is_explained(world: World) -> None:
    if world.kind != "podman":
        pytest.skip("the FORWARD DROP trap is Docker's policy breaking Podman internal networks")
    name = world.new_name("fwd")
    net = f"keyward-{name}-net"
    labels = {**TEST_LABELS, pair.LABEL_PAIR: name}
    world.run(lambda c: c.network_create(net, internal=True, labels=labels))
    nets = world.run(lambda c: pair.internal_podman_networks(c, [net, world.network]))
    problems = forward_drop_problems(nets)
    policy = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
    if "-P FORWARD DROP" not in policy.stdout:
        pytest.skip("Docker's FORWARD DROP policy is not set on this host")
    assert len(problems) == 1, problems  # the fixture's network has the DOCKER-USER accept
    assert net in problems[0] and "iptables -I DOCKER-USER" in problems[0]
