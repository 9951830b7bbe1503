"""Hot reload (file change, SIGHUP, `keyward reload`), the policy hash on every record, secret
rotation without a restart, and `keyward run`'s child dying with its gateway."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.runtime.reload import Reloader
from tests.support.embedded import running, with_service
from tests.support.wait import async_wait_until
from tests.support.world import REAL_KEY, World, make_world

ROOT = Path(__file__).resolve().parent.parent
KEYWARD = [sys.executable, "-m", "gateway"]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    with_service(w)
    yield w
    await w.upstream.close()


def add_host(world: World, rule: str) -> None:
    text = world.config.read_text()
    world.config.write_text(text.replace("  hosts:\n", f"  hosts:\n    {rule}\n", 1))


async def test_reload_applies_to_new_requests_and_records_the_policy(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(world) as gw:
        reloader = Reloader(gw.ctx, environ={"TEST_API_KEY": REAL_KEY})
        assert (await gw.via_proxy("/before", host="evil.example.test"))[0] == 403
        before = gw.ctx.config.digest
        add_host(world, "evil.example.test: {}")
        assert await reloader.reload()
        assert gw.ctx.config.digest != before
        assert (await gw.via_proxy("/after", host="evil.example.test"))[0] == 200
        # an invalid config keeps the running policy, with one error line naming file:line
        good = gw.ctx.config.digest
        world.config.write_text(
            world.config.read_text().replace(
                "open.example.test: {}", "open.example.test: {bogus: 1}"
            )
        )
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="keyward.reload"):
            assert not await reloader.reload()
        [line] = [r.getMessage() for r in caplog.records]
        assert "keyward.yaml:" in line and "bogus" in line and "keeping policy" in line
        assert gw.ctx.config.digest == good
        assert (await gw.via_proxy("/still", host="evil.example.test"))[0] == 200
    recs = {r["path"]: r for r in world.audit()}
    assert recs["/before"]["policy"] == before and recs["/before"]["decision"] == "deny"
    assert recs["/after"]["policy"] == good and recs["/still"]["policy"] == good


async def test_file_secret_rotates_without_restart_by_watching(world: World) -> None:
    secret = world.dir / "key.txt"
    secret.write_text(REAL_KEY + "\n")
    secret.chmod(0o600)
    world.config.write_text(
        world.config.read_text().replace("key: { env: TEST_API_KEY }", f"key: {{ file: {secret} }}")
    )
    rotated = "sk-test-ROTATED-9876543210fedcbaZYX"
    async with running(world) as gw:
        reloader = Reloader(gw.ctx)
        watch = asyncio.get_running_loop().create_task(reloader.watch(interval=0.05))
        try:
            await gw.via_service("/one")
            seen = world.upstream.seen.requests[-1]["headers"]["Authorization"]  # type: ignore[index]
            assert seen == f"Bearer {REAL_KEY}"
            secret.write_text(rotated + "\n")
            for _ in range(400):  # until the watcher has reloaded (bounded)
                if reloader.reloads:
                    break
                await asyncio.sleep(0.05)
            assert reloader.reloads == 1
            status, _, body = await gw.via_service("/two")
            seen = world.upstream.seen.requests[-1]["headers"]["Authorization"]  # type: ignore[index]
            assert status == 200 and seen == f"Bearer {rotated}"
            assert rotated not in body and REAL_KEY not in body  # both still scrubbed
        finally:
            watch.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_survives_sighup_and_reloads(tmp_path: Path) -> None:
    cfg = tmp_path / "k.yaml"
    # An env secret: serve withdraws it from its environment at start, and a reload must
    # still find it.
    head = "version: 1\nsecrets:\n  k: { env: RELOAD_TEST_KEY }\negress:\n  hosts:\n"
    cfg.write_text(head + '    a.example.test: { headers: { X-K: "{k}" } }\n')
    ready = tmp_path / "ready"
    sock = tmp_path / "control.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RELOAD_TEST_KEY": "sk-test-reload-0123456789"}
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen(
        [
            *KEYWARD,
            "serve",
            "-c",
            str(cfg),
            "--no-netfilter",
            "--proxy-uid",
            str(os.getuid()),
            "--state",
            str(tmp_path / "state"),
            "--ready-file",
            str(ready),
            "--control-socket",
            str(sock),
            "--transparent-port",
            ports[0],
            "--explicit-port",
            ports[1],
            "--dns-port",
            ports[2],
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "not ready"
        proc.send_signal(signal.SIGHUP)
        cfg.write_text(head + '    b.example.test: { headers: { X-K: "{k}" } }\n')
        r = subprocess.run(
            [*KEYWARD, "reload", "--control-socket", str(sock)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and r.stdout.startswith("reloaded: policy "), r.stderr
        assert proc.poll() is None and ready.exists()  # SIGHUP did not kill it
        cfg.write_text(head + "    b.example.test: {nope: 1}\n")
        r = subprocess.run(
            [*KEYWARD, "reload", "--control-socket", str(sock)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1 and "reload refused" in r.stderr
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "k.yaml:6:" in err and "nope" in err
    assert not ready.exists()


async def test_run_child_dies_with_its_gateway(world: World, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    proc = await asyncio.create_subprocess_exec(
        *world.run_argv(sys.executable, "-c", code),
        env=world.env(),
        cwd=world.dir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    child = 0
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text():
                child = int(pidfile.read_text())
                break
            await asyncio.sleep(0.1)
        assert child
        proc.kill()  # the gateway dies without any chance to clean up
        await proc.wait()
        await async_wait_until(lambda: not Path(f"/proc/{child}").exists(), what="the child to die")
    finally:
        if child:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
