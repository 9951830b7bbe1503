"""The engine client against real Docker and Podman sockets (marker `engine`).

Each test runs once per engine kind. The sockets are found by asking /_ping what answers (on the
CI machine: Docker at /run/docker.sock, Podman at /run/podman/podman.sock; pin others with
KEYWARD_TEST_DOCKER_SOCKET / KEYWARD_TEST_PODMAN_SOCKET). No registry is needed: each test imports
a one-binary image (static busybox) through the API. Containers have no network or only an
`Internal` one. Everything created carries `keyward.test=1` plus a per-test run label, and is
removed after the test, also when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import struct
import tarfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.engine.client import MAX_API_VERSION, EngineClient, parse_version
from gateway.engine.errors import Conflict, EngineError, NotFound
from gateway.engine.stream import Stream
from tests.conftest import require_engine

pytestmark = pytest.mark.engine

APPLETS = ("sh", "echo", "cat", "sleep", "ls", "readlink", "id", "true", "env")


def static_busybox() -> str:
    """Path of a statically linked busybox (an image with nothing else must run it)."""
    path = shutil.which("busybox")
    problem = None
    if path is None:
        problem = "busybox not installed (apt-get install busybox-static)"
    elif _elf_interpreter(path):
        problem = f"{path} is dynamically linked (apt-get install busybox-static)"
    if problem is None:
        assert path is not None
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"engine test cannot run with CI=true: {problem}", pytrace=False)
    pytest.skip(problem)


def _elf_interpreter(path: str) -> bool:
    """Whether a 64-bit little-endian ELF asks for a dynamic loader (has PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return True  # not something we can check: treat as unusable
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def rootfs_tar(busybox: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/:/bin/sh\nagent:x:1000:1000:agent:/tmp:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(passwd))
    return buf.getvalue()


def file_tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Real:
    client: EngineClient
    kind: str
    socket: str
    run: str
    image: str
    labels: dict[str, str]
    images: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        return f"keyward-test-{what}-{self.run}"

    async def container(
        self, what: str, cmd: list[str], host_config: dict[str, Any] | None = None, **extra: Any
    ) -> str:
        config = {
            "Image": self.image,
            "Cmd": cmd,
            "Labels": self.labels,
            "HostConfig": host_config or {"NetworkMode": "none"},
            **extra,
        }
        return await self.client.container_create(self.name(what), config)


async def cleanup(c: EngineClient, run: str, images: list[str]) -> list[str]:
    """Remove everything labelled with this run; joiners before the containers they join."""
    failures: list[str] = []
    label = {"label": [f"keyward.test.run={run}"]}

    async def attempt(what: str, coro: Any) -> None:
        try:
            await coro
        except NotFound:
            pass
        except EngineError as e:
            failures.append(f"{what}: {e}")

    containers = await c.container_list(label)
    joiners = [
        x
        for x in containers
        if str(x.get("HostConfig", {}).get("NetworkMode", "")).startswith("container:")
    ]
    for x in joiners + [x for x in containers if x not in joiners]:
        await attempt(
            f"container {x['Id'][:12]}", c.container_remove(x["Id"], force=True, volumes=True)
        )
    for n in await c.network_list(label):
        await attempt(f"network {n['Name']}", c.network_remove(n["Id"]))
    for v in await c.volume_list(label):
        await attempt(f"volume {v['Name']}", c.volume_remove(v["Name"], force=True))
    # Built images inherit the base's labels, so the list holds parents and children in any
    # order; an engine refuses to remove a parent first (409). Retry while removals progress.
    pending = [img["Id"] for img in await c.image_list(label)] + list(images)
    while pending:
        refused: list[str] = []
        last: dict[str, Conflict] = {}
        for ref in pending:
            try:
                await c.image_remove(ref, force=True)
            except NotFound:
                pass
            except Conflict as e:
                refused.append(ref)
                last[ref] = e
            except EngineError as e:
                failures.append(f"image {ref}: {e}")
        if len(refused) == len(pending):
            failures.extend(f"image {ref}: {last[ref]}" for ref in refused)
            break
        pending = refused
    return failures


@pytest.fixture(params=["docker", "podman"])
async def real(request: pytest.FixtureRequest) -> AsyncIterator[Real]:
    kind: str = request.param
    socket_path = require_engine(kind)
    busybox = static_busybox()
    run = uuid.uuid4().hex[:10]
    labels = {"keyward.test": "1", "keyward.test.run": run}
    image = f"localhost/keyward-test:bb-{run}"
    async with EngineClient(socket_path) as c:
        env = Real(c, kind, socket_path, run, image, labels, images=[image])
        try:
            await c.image_import(
                rootfs_tar(busybox),
                image,
                changes=[
                    "LABEL keyward.test=1",
                    f"LABEL keyward.test.run={run}",
                    'CMD ["/bin/sh"]',
                ],
            )
            yield env
        finally:
            failures = await cleanup(c, run, env.images)
            left = await c.container_list({"label": [f"keyward.test.run={run}"]})
            assert not failures and not left, (failures, left)


async def test_ping_kind_and_negotiated_version(real: Real) -> None:
    c = real.client
    ping = await c.ping()
    assert ping.kind == real.kind
    assert (ping.libpod_api_version is not None) == (real.kind == "podman")
    negotiated = await c.negotiate()
    server_max, server_min = c.server_api_versions
    assert server_max is not None
    assert parse_version(negotiated) <= max(
        parse_version(MAX_API_VERSION), parse_version(server_min or "0")
    )
    assert parse_version(negotiated) <= parse_version(server_max)
    if server_min:
        assert parse_version(negotiated) >= parse_version(server_min)
    assert (await c.version()).get("Version")
    assert isinstance(await c.is_rootless(), bool)
    info = await c.image_inspect(real.image)
    assert info["Config"]["Labels"]["keyward.test"] == "1"


async def test_container_exec_logs_wait_remove(real: Real) -> None:
    c = real.client
    script = (
        "echo started; echo to-err >&2; "
        "while [ ! -e /tmp/stop ]; do sleep 0.1; done; echo stopping; exit 4"
    )
    cid = await real.container("main", ["/bin/sh", "-c", script])
    await c.container_start(cid)
    state = await c.container_inspect(cid)
    assert state["State"]["Running"] is True
    assert state["HostConfig"]["NetworkMode"] == "none"

    r = await c.exec_run(cid, ["echo", "hi"])
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"hi\n", b"")

    r = await c.exec_run(cid, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")

    r = await c.exec_run(cid, ["cat"], stdin=b"piped in")
    assert (r.exit_code, r.stdout) == (0, b"piped in")

    r = await c.exec_run(
        cid, ["/bin/sh", "-c", "id -u; echo $GREETING"], user="1000", env={"GREETING": "hello"}
    )
    assert (r.exit_code, r.stdout) == (0, b"1000\nhello\n")

    r = await c.exec_run(cid, ["ls", "/sys/class/net"])
    assert r.stdout.split() == [b"lo"]  # NetworkMode none: loopback only

    await c.put_archive(cid, "/tmp", file_tar("hello.txt", b"from put_archive\n"))
    r = await c.exec_run(cid, ["cat", "/tmp/hello.txt"])
    assert r.stdout == b"from put_archive\n"

    async with await c.exec_stream(cid, ["/bin/sh", "-c", "echo a; echo b >&2; exit 9"]) as ex:
        frames = [f async for f in ex]
    assert sorted(frames) == [(Stream.STDOUT, b"a\n"), (Stream.STDERR, b"b\n")]
    assert ex.exit_code == 9

    attached = asyncio.Event()

    async def follow() -> dict[Stream, bytes]:
        got = {Stream.STDOUT: b"", Stream.STDERR: b""}
        async for stream, data in c.container_logs(cid, follow=True):
            got[stream] += data
            attached.set()
        return got

    follower = asyncio.ensure_future(follow())
    await asyncio.wait_for(attached.wait(), 30)  # following before the container goes on
    await c.exec_run(cid, ["/bin/sh", "-c", ": > /tmp/stop"])
    assert await asyncio.wait_for(c.container_wait(cid), 30) == 4
    logs = await asyncio.wait_for(follower, 30)
    assert logs[Stream.STDOUT] == b"started\nstopping\n"
    assert logs[Stream.STDERR] == b"to-err\n"

    await c.container_remove(cid, volumes=True)
    with pytest.raises(NotFound):
        await c.container_inspect(cid)


async def test_volume_and_internal_network(real: Real) -> None:
    c = real.client
    vol = await c.volume_create(real.name("vol"), labels=real.labels)
    assert vol["Name"] == real.name("vol")
    assert (await c.volume_inspect(real.name("vol")))["Labels"]["keyward.test"] == "1"
    listed = await c.volume_list({"label": [f"keyward.test.run={real.run}"]})
    assert [v["Name"] for v in listed] == [real.name("vol")]

    net_id = await c.network_create(real.name("net"), internal=True, labels=real.labels)
    net = await c.network_inspect(net_id)
    assert net["Internal"] is True
    assert net["Labels"]["keyward.test.run"] == real.run
    other_id = await c.network_create(real.name("net2"), internal=True, labels=real.labels)

    cid = await real.container(
        "onnet",
        ["sleep", "300"],
        {"NetworkMode": real.name("net"), "Binds": [f"{real.name('vol')}:/data"]},
    )
    await c.container_start(cid)
    r = await c.exec_run(cid, ["ls", "/sys/class/net"])
    assert b"eth0" in r.stdout.split(), r
    await c.exec_run(cid, ["/bin/sh", "-c", "echo kept > /data/f"])

    await c.network_connect(other_id, cid)
    attached = (await c.container_inspect(cid))["NetworkSettings"]["Networks"]
    assert {real.name("net"), real.name("net2")} <= set(attached)

    with pytest.raises(Conflict):  # in use by a container
        await c.volume_remove(real.name("vol"))
    await c.container_remove(cid, force=True)
    await c.network_remove(net_id)
    await c.network_remove(other_id)
    with pytest.raises(NotFound):
        await c.network_inspect(net_id)
    await c.volume_remove(real.name("vol"))
    with pytest.raises(NotFound):
        await c.volume_inspect(real.name("vol"))


async def test_second_container_joins_first_namespace(real: Real) -> None:
    c = real.client
    owner = await real.container("owner", ["sleep", "300"])
    await c.container_start(owner)
    joiner = await real.container("joiner", ["sleep", "300"], {"NetworkMode": f"container:{owner}"})
    await c.container_start(joiner)
    alone = await real.container("alone", ["sleep", "300"])
    await c.container_start(alone)

    async def netns(cid: str) -> bytes:
        r = await c.exec_run(cid, ["readlink", "/proc/self/ns/net"])
        assert r.exit_code == 0, r
        return r.stdout.strip()

    assert await netns(owner) == await netns(joiner)
    assert await netns(alone) != await netns(owner)
    # Podman refuses removing the owner first: the joiner goes first.
    await c.container_remove(joiner, force=True)
    await c.container_remove(owner, force=True)


async def test_real_error_shapes(real: Real) -> None:
    c = real.client
    with pytest.raises(NotFound):
        await c.container_inspect(real.name("nonexistent"))
    with pytest.raises(NotFound):
        await c.image_inspect(f"localhost/keyward-test:none-{real.run}")
    await real.container("dup", ["true"])
    with pytest.raises(Conflict):
        await real.container("dup", ["true"])
    # The only "registry" is a closed loopback port: Docker fails with 500, Podman inside a 200.
    with pytest.raises(EngineError, match="refused"):
        await c.image_pull(f"localhost:1/keyward-test/none:{real.run}")


async def test_build_offline(real: Real) -> None:
    c = real.client

    def context(steps: str) -> bytes:
        text = f"FROM {real.image}\n{steps}\n".encode()
        return file_tar("Containerfile", text)

    tag = f"localhost/keyward-test:built-{real.run}"
    real.images.append(tag)
    lines: list[dict[str, Any]] = []
    image_id = await c.image_build(
        context("RUN echo built > /built"),
        tag,
        {"UNUSED": "x"},
        dockerfile="Containerfile",
        labels=real.labels,
        network_mode="none",
        progress=lines.append,
    )
    assert image_id.startswith("sha256:") or len(image_id) == 64
    assert lines
    cid = await real.container("built", ["cat", "/built"], Image=tag)
    await c.container_start(cid)
    assert await asyncio.wait_for(c.container_wait(cid), 30) == 0
    out = b"".join([d async for _, d in c.container_logs(cid)])
    assert out == b"built\n"

    failing = f"localhost/keyward-test:fails-{real.run}"
    real.images.append(failing)
    with pytest.raises(EngineError) as err:
        await c.image_build(
            context("RUN exit 7"),
            failing,
            dockerfile="Containerfile",
            labels=real.labels,
            network_mode="none",
        )
    assert "7" in str(err.value)
    with contextlib.suppress(EngineError):
        await c.image_remove(failing, force=True)
