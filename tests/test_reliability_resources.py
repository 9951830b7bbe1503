"""File descriptors: the soft limit is raised at start, and running out of them is a counted
log line per second, not a traceback per failed accept."""

from __future__ import annotations

import asyncio
import logging
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.planes.resources import AcceptErrorLimiter
from tests.support.wait import BOUND
from tests.support.world import World, make_world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    await w.upstream.close()


def test_run_raises_the_fd_soft_limit_to_the_hard_limit(world: World) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard fd limit {hard} leaves nothing to raise")

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    code = "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    r = subprocess.run(
        world.run_argv(sys.executable, "-c", code),
        env=world.env(),
        cwd=world.dir,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=low,
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 256  # inherited from the gateway, which raised its own


async def test_accept_errors_are_counted_once_per_second(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    limiter = AcceptErrorLimiter(interval=3600)
    err = OSError(24, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="keyward"):
        for _ in range(10_000):
            limiter(loop, {"message": "socket.accept() out of system resource", "exception": err})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Too many open files" in lines[0]
    assert limiter.total == 10_000


async def test_real_emfile_on_accept_is_rate_limited(tmp_path: Path) -> None:
    """A server at its fd limit with clients still connecting: one line, not a flood."""
    script = tmp_path / "server.py"
    script.write_text(
        "import asyncio, resource, socket, sys\n"
        "from gateway.planes.resources import AcceptErrorLimiter\n"
        "async def main():\n"
        "    AcceptErrorLimiter(interval=3600).install()\n"
        "    held = []\n"
        "    async def handle(r, w):\n"
        "        held.append(w)\n"
        "    server = await asyncio.start_server(handle, '127.0.0.1', 0)\n"
        "    port = server.sockets[0].getsockname()[1]\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "    print(port, flush=True)\n"
        "    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    port = int(await proc.stdout.readline())
    clients = []
    for _ in range(150):
        try:
            clients.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    head = b""
    async with asyncio.timeout(BOUND):  # the server hits its limit and says so (a hang bound)
        while b"accepting connections failed" not in head:
            line = await proc.stderr.readline()
            assert line, head.decode()
            head += line
    # asyncio retries the accept every second: without the limiter, more lines would follow
    await asyncio.sleep(2.5)
    proc.stdin.write(b"stop\n")
    _, err = await proc.communicate()
    for _, w in clients:
        w.close()
    text = (head + err).decode()
    assert text.count("accepting connections failed") == 1, text[:2000]
    assert "Traceback" not in text
