"""The real openai and anthropic SDKs as an agent runs them, under `keyward run`: the SDK holds
only the placeholder key, the fake upstream receives the real one, and a streamed (SSE) answer
reaches the SDK event by event. Python, and Node when node and npm are installed.

The Python SDKs cannot share the test environment (their httpx needs an h11 that mitmproxy 11
refuses), so they get their own venv; the Node SDKs their own node_modules; both are made once
and kept under build/ (scripts/test runs pytest without its cache plugin). When they cannot be
made the tests skip, or fail when CI=true."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import model_api
from tests.support.pki import make_ca
from tests.support.upstream import Upstream
from tests.support.world import KEYWARD, ROOT

OPENAI_KEY = "sk-proj-REALopenai-0123456789abcdefghijklmnopqrstuv"
ANTHROPIC_KEY = "sk-ant-api03-REALanthropic-0123456789abcdefghijklmnop"
NAMES = ("api.openai.test", "api.anthropic.test")
CONFIG = """version: 1
secrets:
  openai: {{ env: OPENAI_API_KEY }}
  anthropic: {{ env: ANTHROPIC_API_KEY }}
egress:
  default: deny
  hosts:
    api.openai.test:
      headers: {{ Authorization: "Bearer {{openai}}" }}
    api.anthropic.test:
      headers: {{ x-api-key: "{{anthropic}}" }}
placeholders:
  OPENAI_API_KEY: {{ secret: openai }}
  ANTHROPIC_API_KEY: {{ secret: anthropic }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.openai.test:443": "127.0.0.1:{port}"
    "api.anthropic.test:443": "127.0.0.1:{port}"
audit:
  path: audit.jsonl
"""
SDKS = ("openai", "anthropic")


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SDK venv cannot be made with CI=true: {why}", pytrace=False)
    pytest.skip(why)


def _make(steps: list[list[str]], cwd: Path | None = None) -> None:
    for argv in steps:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd)
        except (OSError, subprocess.TimeoutExpired) as e:
            _unavailable(f"{argv[:4]}: {e}")
        if r.returncode != 0:
            _unavailable(f"{argv[:4]} exited {r.returncode}: {r.stderr[-1500:]}")


@pytest.fixture(scope="session")
def sdk_python() -> str:
    """A Python with the openai and anthropic SDKs, in a venv kept under build/."""
    venv = ROOT / "build" / "sdk-clients-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import " + ", ".join(SDKS)]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    shutil.rmtree(venv, ignore_errors=True)
    _make(
        [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", *SDKS],
            probe,
        ]
    )
    return str(python)


# undici: its EnvHttpProxyAgent is how a Node older than 22.21 / 24.5 (whose fetch ignores
# HTTPS_PROXY) sends these SDKs through a proxy; newer Nodes would not need it.
NODE_PACKAGES = {"openai": "openai", "anthropic": "@anthropic-ai/sdk", "undici": "undici"}


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """A directory whose node_modules has the openai and anthropic SDKs (and undici)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed")
    where = ROOT / "build" / "sdk-clients-node"
    where.mkdir(parents=True, exist_ok=True)
    probe = [node, "-e", "".join(f"require({p!r});" for p in NODE_PACKAGES.values())]
    if subprocess.run(probe, capture_output=True, cwd=where).returncode == 0:
        return where
    (where / "package.json").write_text('{"private": true}\n')
    install = [npm, "install", "--no-audit", "--no-fund", "--no-save", *NODE_PACKAGES.values()]
    _make([install, probe], cwd=where)
    return where


class SdkWorld:
    def __init__(self, directory: Path, upstream: Upstream) -> None:
        self.dir, self.upstream = directory, upstream

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env |= {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
        env |= {"KEYWARD_STATE": str(self.dir / "state"), "PYTHONPATH": str(ROOT)}
        return env

    async def run(self, *cmd: str) -> tuple[int, str, str]:
        argv = [*KEYWARD, "run", "-c", str(self.dir / "keyward.yaml"), "--", *cmd]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=self.env(),
            cwd=self.dir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 300)
        return proc.returncode or 0, out.decode(), err.decode()

    def seen(self, path: str) -> list[dict[str, object]]:
        return [r for r in self.upstream.seen.requests if r["path"] == path]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[SdkWorld]:
    ca = make_ca(tmp_path / "pki")
    upstream = await Upstream.start(ca.server_context(tmp_path / "pki", *NAMES))
    (tmp_path / "keyward.yaml").write_text(CONFIG.format(ca=ca.path, port=upstream.port))
    yield SdkWorld(tmp_path, upstream)
    await upstream.close()


# Each script prints the key it holds, the plain answer, then the streamed text one delta a
# line; after the first delta it asks the upstream to release the rest of the stream.
RELEASE = """
import urllib.request
def release():
    urllib.request.urlopen("https://api.openai.test/release?gate=model", timeout=60).read()
"""
SCRIPTS = {
    "openai": """
import os, openai
client = openai.OpenAI(base_url="https://api.openai.test/v1", max_retries=0, timeout=120)
print(os.environ["OPENAI_API_KEY"])
msgs = [{"role": "user", "content": "hi"}]
print(client.chat.completions.create(model="gpt-test", messages=msgs).choices[0].message.content)
stream = client.chat.completions.create(model="gpt-test", messages=msgs, stream=True)
for n, chunk in enumerate(c for c in stream if c.choices and c.choices[0].delta.content):
    print(repr(chunk.choices[0].delta.content), flush=True)
    if n == 0:
        release()
""",
    "anthropic": """
import os, anthropic
client = anthropic.Anthropic(base_url="https://api.anthropic.test", max_retries=0, timeout=120)
print(os.environ["ANTHROPIC_API_KEY"])
msgs = [{"role": "user", "content": "hi"}]
print(client.messages.create(model="claude-test", max_tokens=8, messages=msgs).content[0].text)
with client.messages.stream(model="claude-test", max_tokens=8, messages=msgs) as stream:
    for n, text in enumerate(stream.text_stream):
        print(repr(text), flush=True)
        if n == 0:
            release()
""",
}
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@pytest.mark.parametrize("sdk", SDKS)
async def test_sdk_holds_placeholder_upstream_gets_key_stream_flows(
    world: SdkWorld, sdk_python: str, sdk: str
) -> None:
    script = textwrap.dedent(RELEASE + SCRIPTS[sdk])
    code, out, err = await world.run(sdk_python, "-c", script)
    assert code == 0, f"stdout: {out[-2000:]}\nstderr: {err[-4000:]}"
    _check(world, sdk, out, err, [repr(model_api.FIRST), repr(model_api.SECOND)])


def _check(world: SdkWorld, sdk: str, out: str, err: str, deltas: list[str]) -> None:
    """The SDK printed the placeholder it holds, the plain answer, then `deltas` one a line."""
    real = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}[sdk]
    held, plain, *streamed = out.splitlines()
    assert held and held != real  # the SDK only ever had the placeholder
    assert real not in out + err
    assert plain == model_api.FIRST + model_api.SECOND
    assert streamed == deltas
    hits = world.seen(PATHS[sdk])
    assert len(hits) == 2
    for hit in hits:
        assert isinstance(hit["headers"], dict)
        headers = {k.lower(): v for k, v in hit["headers"].items()}
        if sdk == "openai":
            assert headers["authorization"] == f"Bearer {real}"
        else:
            assert headers["x-api-key"] == real
        assert held not in str(headers)
    assert len(world.seen("/release?gate=model")) == 1
    assert world.upstream.seen.stalled_gates == []


NODE_PRELUDE = """
const undici = require("undici");
undici.setGlobalDispatcher(new undici.EnvHttpProxyAgent());
const opts = { maxRetries: 0, timeout: 120000, fetch: undici.fetch };
async function release() {
  await (await undici.fetch("https://api.openai.test/release?gate=model")).text();
}
const msgs = [{ role: "user", content: "hi" }];
"""
NODE_SCRIPTS = {
    "openai": """
const OpenAI = require("openai").default;
(async () => {
  const client = new OpenAI({ ...opts, baseURL: "https://api.openai.test/v1" });
  console.log(process.env.OPENAI_API_KEY);
  const plain = await client.chat.completions.create({ model: "gpt-test", messages: msgs });
  console.log(plain.choices[0].message.content);
  const stream = await client.chat.completions.create({ model: "gpt-test", messages: msgs, stream: true });
  let n = 0;
  for await (const chunk of stream) {
    const text = chunk.choices[0] && chunk.choices[0].delta.content;
    if (!text) continue;
    console.log(JSON.stringify(text));
    if (n++ === 0) await release();
  }
})().catch((e) => { console.error(e); process.exit(1); });
""",
    "anthropic": """
const Anthropic = require("@anthropic-ai/sdk").default;
(async () => {
  const client = new Anthropic({ ...opts, baseURL: "https://api.anthropic.test" });
  console.log(process.env.ANTHROPIC_API_KEY);
  const req = { model: "claude-test", max_tokens: 8, messages: msgs };
  console.log((await client.messages.create(req)).content[0].text);
  let n = 0;
  for await (const ev of client.messages.stream(req)) {
    if (ev.type !== "content_block_delta") continue;
    console.log(JSON.stringify(ev.delta.text));
    if (n++ === 0) await release();
  }
})().catch((e) => { console.error(e); process.exit(1); });
""",
}


@pytest.mark.parametrize("sdk", SDKS)
async def test_node_sdk_holds_placeholder_upstream_gets_key_stream_flows(
    world: SdkWorld, node_modules: Path, sdk: str
) -> None:
    script = node_modules / f"{sdk}-client.js"
    script.write_text(NODE_PRELUDE + NODE_SCRIPTS[sdk])
    code, out, err = await world.run("node", str(script))
    assert code == 0, f"stdout: {out[-2000:]}\nstderr: {err[-4000:]}"
    _check(world, sdk, out, err, [json.dumps(model_api.FIRST), json.dumps(model_api.SECOND)])
