"""`git push` of a 5 MiB commit through `keyward run`, with git's default settings.

git offers HTTP/2 and sends a pack over its 1 MiB post buffer as a body of unknown length: the
case that once reached an HTTP/1.1 upstream unframed. The server is the real `git http-backend`
(CGI) behind a small HTTPS aiohttp app on loopback, reached through `upstream.resolve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.pki import make_ca
from tests.support.world import KEYWARD, REAL_KEY, ROOT

GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")

CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    git.example.test:
      basic: {{ username: x-access-token, password: "{{key}}" }}
upstream:
  ca_bundle: {ca}
  resolve: {{ "git.example.test:443": "127.0.0.1:{port}" }}
audit:
  path: audit.jsonl
"""


@dataclass
class GitServer:
    port: int
    root: Path
    auth: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)


def backend_exe() -> str:
    out = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True)
    return str(Path(out.stdout.strip()) / "git-http-backend")


def cgi_app(server: GitServer) -> web.Application:
    exe = backend_exe()

    async def handle(request: web.Request) -> web.Response:
        server.auth.append(request.headers.get("Authorization", ""))
        server.versions.append(f"{request.version.major}.{request.version.minor}")
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REMOTE_USER": "agent",  # lets http-backend accept receive-pack
            "REQUEST_METHOD": request.method,
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        if "Git-Protocol" in request.headers:
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        proc = await asyncio.create_subprocess_exec(
            exe,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers[name.strip()] = value.strip()
        return web.Response(status=status, body=payload, headers=headers)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def git_server(tmp_path: Path) -> AsyncIterator[tuple[GitServer, Path]]:
    ca = make_ca(tmp_path / "pki")
    root = tmp_path / "srv"
    root.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", str(root / "repo.git")], check=True)
    server = GitServer(0, root)
    runner = web.AppRunner(cgi_app(server), access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner, "127.0.0.1", 0, ssl_context=ca.server_context(tmp_path / "pki", "git.example.test")
    )
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    (tmp_path / "keyward.yaml").write_text(CONFIG.format(ca=ca.path, port=server.port))
    yield server, tmp_path
    await runner.cleanup()


async def test_git_push_of_5_mib_through_keyward_run(git_server: tuple[GitServer, Path]) -> None:
    server, tmp = git_server
    work = tmp / "work"
    work.mkdir()
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.update(
        TEST_API_KEY=REAL_KEY,
        KEYWARD_STATE=str(tmp / "state"),
        PYTHONPATH=str(ROOT),
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="a",
        GIT_AUTHOR_EMAIL="a@example.test",
        GIT_COMMITTER_NAME="a",
        GIT_COMMITTER_EMAIL="a@example.test",
    )
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    (work / "blob.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # incompressible: 5 MiB pack
    subprocess.run(["git", "-C", str(work), "add", "."], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "big"], check=True, env=env)
    argv = [*KEYWARD, "run", "-c", str(tmp / "keyward.yaml"), "--",
            "git", "-C", str(work), "push", "https://git.example.test/repo.git", "main"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=tmp, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()[-3000:]
    pushed = subprocess.run(
        ["git", "--git-dir", str(server.root / "repo.git"), "rev-parse", "main"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip()  # fmt: skip
    local = subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert pushed == local
    assert server.auth and all(a.startswith("Basic ") for a in server.auth)
    records = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines() if x]
    pack = [r for r in records if str(r["path"]).endswith("/git-receive-pack")]
    assert pack and all(r["decision"] == "allow" for r in pack)
    assert max(int(r["bytes_up"]) for r in pack) > 5 * 1024 * 1024
    assert len(records) == len(server.auth)  # every request that reached git is audited
    assert REAL_KEY not in (out + err).decode() + (tmp / "audit.jsonl").read_text()
