"""Every common client, unchanged, trusts the gateway and uses its proxy under `keyward run`:
the environment comes from one builder (gateway.tls.trust.agent_env). A client passes when the
fake upstream received its request carrying the real key (so it went through the gateway, over
TLS the client verified against the keyward CA). Clients not installed here are skipped; the
openai and anthropic SDKs, which need their own environment, are in test_sdk_clients.py."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.world import CONFIG, REAL_KEY, World, make_world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    services = "services:\n  api: {{ listen: 0, upstream: https://api.example.test }}\naudit:"
    w = await make_world(tmp_path, CONFIG.replace("audit:", services, 1))
    yield w
    await w.upstream.close()


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _have_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _node_version() -> tuple[int, ...]:
    node = shutil.which("node")
    if node is None:
        return ()
    out = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    return tuple(int(x) for x in re.findall(r"\d+", out)[:3])


NODE = _node_version()
# Node honours the proxy variables (NODE_USE_ENV_PROXY) from 22.21 and 24.5 on.
NODE_ENV_PROXY = NODE >= (24, 5) or (22, 21) <= NODE < (23,)


def _skip(cond: bool, why: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(cond, reason=why)


# (id, argv template, path prefix the upstream must see, skip mark). {dir} = a scratch dir.
CLIENTS = [
    pytest.param(
        ["curl", "-sS", "https://api.example.test/curl/x"],
        "/curl/x",
        marks=_skip(shutil.which("curl") is None, "curl not installed"),
        id="curl",
    ),
    pytest.param(
        ["git", "ls-remote", "https://api.example.test/git/repo.git"],
        "/git/repo.git/info/refs",
        marks=_skip(shutil.which("git") is None, "git not installed"),
        id="git",
    ),
    pytest.param(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--retries",
            "0",
            "-d",
            "{dir}",
            "--index-url",
            "https://api.example.test/pip/simple/",
            "nothing-here",
        ],
        "/pip/simple/nothing-here/",
        id="pip",
    ),
    pytest.param(
        # a user's own npm `cafile` hides NODE_EXTRA_CA_CERTS: NPM_CONFIG_CAFILE must win
        [
            "sh",
            "-c",
            "printf 'cafile={ca}\\n' > {dir}/npmrc && NPM_CONFIG_USERCONFIG={dir}/npmrc "
            "npm view nothing-here --registry https://api.example.test/npm/ --cache {dir}/cache "
            "--fetch-retries 0 --update-notifier false",
        ],
        "/npm/nothing-here",
        marks=_skip(shutil.which("npm") is None, "npm not installed"),
        id="npm",
    ),
    pytest.param(
        _py(
            """
            import urllib.request
            urllib.request.urlopen("https://api.example.test/urllib/x").read()
            """
        ),
        "/urllib/x",
        id="urllib",
    ),
    pytest.param(
        _py(
            """
            from websockets.sync.client import connect
            with connect("wss://api.example.test/ws") as ws:
                print(ws.recv())
            """
        ),
        "/ws",
        marks=_skip(not _have_module("websockets"), "websockets not installed"),
        id="websockets",
    ),
    pytest.param(
        ["node", "-e", "fetch('https://api.example.test/node-fetch').then(r => r.text())"],
        "/node-fetch",
        marks=_skip(not NODE_ENV_PROXY, "this Node does not honour proxy variables"),
        id="node-fetch",
    ),
    pytest.param(
        [
            "node",
            "-e",
            "require('https').get('https://api.example.test/node-https', r => r.resume())",
        ],
        "/node-https",
        marks=_skip(not NODE_ENV_PROXY, "this Node does not honour proxy variables"),
        id="node-https",
    ),
]


async def _run(world: World, argv: list[str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(*argv),
        env=world.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=world.dir,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize(("argv", "path"), CLIENTS)
async def test_client_trusts_the_gateway_and_uses_its_proxy(
    world: World, argv: list[str], path: str
) -> None:
    scratch = world.dir / "scratch"
    scratch.mkdir()
    argv = [a.format(dir=scratch, ca=world.ca.path) for a in argv]
    _, out, err = await _run(world, argv)
    hits = [r for r in world.upstream.seen.requests if str(r["path"]).startswith(path)]
    assert hits, f"the upstream never saw {path}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert hits[0]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    assert REAL_KEY not in out + err
    rejected = [r for r in world.audit() if r["reason"] == "client-tls-rejected"]
    assert rejected == []


async def test_services_reached_by_localhost_bypass_the_proxy(world: World) -> None:
    """`services:` routes written as http://localhost:PORT or http://[::1]... go straight to the
    service listener (NO_PROXY names every loopback spelling), not to the proxy's 403."""
    code, out, err = await _run(
        world,
        _py(
            """
            import os, requests
            url = os.environ["KEYWARD_SERVICE_API_URL"].replace("127.0.0.1", "localhost")
            r = requests.get(url + "/svc", timeout=20)
            print(r.status_code, r.json()["path"])
            """
        ),
    )
    assert code == 0, err
    assert out.split() == ["200", "/svc"]
    rec = world.audit()[-1]
    assert rec["plane"] == "service"
