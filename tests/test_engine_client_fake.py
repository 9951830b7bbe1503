"""The engine client against a fake Docker/Podman API (aiohttp on a unix socket).

The fake reproduces what real engines do that naive clients get wrong: version windows (Docker 29
refuses < 1.44, Docker <= 24 refuses 1.44), errors inside a 200 progress stream, Podman's error body
shape and its 500s that mean 404/409/400, multiplexed frames split anywhere, and the hijacked exec
connection (101 Upgrade, stdin half-close, exit code from a later inspect).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.client import EngineClient, negotiate_version, split_ref
from gateway.engine.errors import (
    BadRequest,
    Conflict,
    EngineError,
    EngineUnavailable,
    NotFound,
    ServerError,
    StreamError,
)
from gateway.engine.stream import FrameDemuxer, Stream, encode_frame

ROOT = Path(__file__).resolve().parent.parent
SPLITS = (1, 3, 7, 2, 8, 5, 1, 13)  # chunk sizes that cut headers and payloads mid-way


def _v(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split("."))


@dataclass
class Exec:
    cmd: list[str]
    stdin: bool
    inspects: int = 0
    started: bool = False


@dataclass
class FakeEngine:
    """State and behaviour of one fake engine; `kind` decides headers and error body shapes."""

    kind: str = "docker"
    api: str = "1.41"
    min_api: str = "1.12"
    rootless: bool = False
    drops_import_name: bool = False
    paths: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    execs: dict[str, Exec] = field(default_factory=dict)
    build_bodies: list[bytes] = field(default_factory=list)

    # -- error bodies as each engine writes them -------------------------------------------------

    def error(
        self, docker_status: int, message: str, cause: str, podman_status: int = 0
    ) -> web.Response:
        if self.kind == "podman":
            status = podman_status or docker_status
            body = {"cause": cause, "message": f"{message}: {cause}", "response": status}
            return web.json_response(body, status=status)
        return web.json_response({"message": message}, status=docker_status)

    # -- app -------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._version_gate])
        r = app.router
        r.add_get("/_ping", self.ping)
        r.add_get("/version", self.version)
        r.add_get("/v{ver}/version", self.version)
        r.add_get("/v{ver}/info", self.info)
        r.add_get("/v{ver}/libpod/info", self.libpod_info)
        r.add_post("/v{ver}/images/create", self.images_create)
        r.add_post("/v{ver}/build", self.build)
        r.add_post("/v{ver}/images/{name:.*}/tag", self.image_tag)
        r.add_get("/v{ver}/images/{name:.*}/json", self.image_inspect)
        r.add_post("/v{ver}/containers/create", self.container_create)
        r.add_get("/v{ver}/containers/{id}/json", self.container_inspect)
        r.add_get("/v{ver}/containers/{id}/logs", self.logs)
        r.add_post("/v{ver}/containers/{id}/exec", self.exec_create)
        r.add_post("/v{ver}/exec/{id}/start", self.exec_start)
        r.add_get("/v{ver}/exec/{id}/json", self.exec_inspect)
        r.add_delete("/v{ver}/volumes/{name}", self.volume_remove)
        r.add_post("/v{ver}/networks/create", self.network_create)
        return app

    @web.middleware
    async def _version_gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.paths.append(request.path)
        ver = request.match_info.get("ver")
        if ver and not request.path.startswith(f"/v{ver}/libpod/"):
            if _v(ver) < _v(self.min_api):
                return web.json_response(
                    {
                        "message": f"client version {ver} is too old. Minimum supported API "
                        f"version is {self.min_api}, please upgrade your client to a newer version"
                    },
                    status=400,
                )
            if _v(ver) > _v(self.api):
                return web.json_response(
                    {
                        "message": f"client version {ver} is too new. Maximum supported API "
                        f"version is {self.api}"
                    },
                    status=400,
                )
        return await handler(request)

    def _headers(self) -> dict[str, str]:
        h = {"Api-Version": self.api, "Server": f"fake-{self.kind}"}
        if self.kind == "podman":
            h["Libpod-Api-Version"] = "5.2.0"
        return h

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="OK", headers=self._headers())

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "Version": f"{self.kind}-fake-1",
                "ApiVersion": self.api,
                "MinAPIVersion": self.min_api,
            },
            headers=self._headers(),
        )

    async def info(self, request: web.Request) -> web.Response:
        opts = ["name=seccomp,profile=builtin"] + (["name=rootless"] if self.rootless else [])
        return web.json_response({"SecurityOptions": opts})

    async def libpod_info(self, request: web.Request) -> web.Response:
        return web.json_response({"host": {"security": {"rootless": self.rootless}}})

    async def _stream(self, request: web.Request, items: list[str]) -> web.StreamResponse:
        """NDJSON written in awkward pieces: objects cut mid-way, CRLF separators."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        data = "\r\n".join(items).encode() + b"\r\n"
        i = 0
        for n in SPLITS * 1000:
            if i >= len(data):
                break
            await resp.write(data[i : i + n * 4])
            await asyncio.sleep(0)
            i += n * 4
        await resp.write_eof()
        return resp

    async def images_create(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        if q.get("fromSrc") == "-":
            body = await request.read()
            assert body.startswith(b"TAR")
            image_id = "sha256:" + "ab" * 32
            if not self.drops_import_name:
                self.images[q["repo"]] = image_id
            self.images[image_id] = image_id
            return await self._stream(request, [json.dumps({"status": image_id})])
        ref = f"{q['fromImage']}:{q.get('tag', 'latest')}"
        progress = [
            json.dumps({"status": f"Pulling from {q['fromImage']}", "id": q.get("tag")}),
            json.dumps(
                {
                    "status": "Downloading",
                    "progressDetail": {"current": 10, "total": 100},
                    "id": "abc",
                }
            ),
        ]
        if "broken" in ref:
            if self.kind == "podman":
                err = "initializing source docker://x: pinging container registry: refused"
                progress.append(
                    json.dumps(
                        {"progressDetail": {}, "errorDetail": {"message": err}, "error": err}
                    )
                )
            else:
                progress.append(
                    json.dumps(
                        {
                            "errorDetail": {
                                "message": "manifest for x not found: manifest unknown"
                            },
                            "error": "manifest for x not found: manifest unknown",
                        }
                    )
                )
        else:
            self.images[ref] = "sha256:" + "cd" * 32
            progress.append(json.dumps({"status": "Status: Downloaded newer image for " + ref}))
        return await self._stream(request, progress)

    async def build(self, request: web.Request) -> web.StreamResponse:
        self.build_bodies.append(await request.read())
        args = json.loads(request.query.get("buildargs", "{}"))
        items = [json.dumps({"stream": "Step 1/2 : FROM scratch\n"})]
        if args.get("FAIL"):
            msg = "The command '/bin/sh -c exit 7' returned a non-zero code: 7"
            items.append(json.dumps({"errorDetail": {"code": 7, "message": msg}, "error": msg}))
        else:
            items.append(json.dumps({"aux": {"ID": "sha256:" + "ef" * 32}}))
            self.images[request.query["t"]] = "sha256:" + "ef" * 32
        # Podman writes objects back to back without newlines; exercise that too.
        if self.kind == "podman":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for item in items:
                await resp.write(item.encode())
            await resp.write_eof()
            return resp
        return await self._stream(request, items)

    async def image_tag(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.images:
            return self.error(404, f"No such image: {name}", "no such image")
        self.images[f"{request.query['repo']}:{request.query['tag']}"] = self.images[name]
        return web.Response(status=201)

    async def image_inspect(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.images:
            # Podman 4 says 500 for a missing image on some paths; the cause tells the truth.
            return self.error(404, f"No such image: {name}", "no such image", podman_status=500)
        return web.json_response({"Id": self.images[name], "RepoTags": [name]})

    async def container_create(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        body = await request.json()
        if name == "taken":
            return self.error(
                409,
                'Conflict. The container name "/taken" is already in use',
                "that name is already in use",
                podman_status=500,
            )
        if body.get("Image") == "bad-config":
            return self.error(
                400, "invalid port specification", "invalid argument", podman_status=500
            )
        if body.get("Image") == "explodes":
            return web.json_response({"message": "runtime exploded"}, status=500)
        return web.json_response({"Id": f"id-{name}", "Warnings": []}, status=201)

    async def container_inspect(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if cid == "missing":
            return self.error(404, "No such container: missing", "no such container")
        return web.json_response({"Id": cid, "Config": {"Tty": cid == "ttybox"}})

    async def logs(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        if cid == "ttybox":
            data = b"\x1b[1mraw tty bytes\r\n"
        else:
            data = b"".join(
                [
                    encode_frame(Stream.STDOUT, b"line one\n"),
                    encode_frame(Stream.STDERR, b"warning: two\n"),
                    encode_frame(Stream.STDOUT, b""),  # empty frames happen
                    encode_frame(Stream.STDOUT, b"x" * 70000 + b"\n"),  # bigger than one read
                    encode_frame(Stream.STDERR, b"last\n"),
                ]
            )
            if cid == "truncated":
                data = data[:-3]
        i = 0
        for n in SPLITS * 100000:
            if i >= len(data):
                break
            await resp.write(data[i : i + n])
            if i < 64:
                await asyncio.sleep(0.001)  # make the first splits real separate reads
            i += n
        await resp.write_eof()
        return resp

    async def exec_create(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if cid == "missing":
            return self.error(404, "No such container: missing", "no such container")
        body = await request.json()
        assert body["Tty"] is False and body["AttachStdout"] and body["AttachStderr"]
        exec_id = "gone" if cid == "vanishing" else f"exec{len(self.execs)}"
        self.execs[exec_id] = Exec(cmd=body["Cmd"], stdin=body["AttachStdin"])
        return web.json_response({"Id": exec_id}, status=201)

    async def exec_start(self, request: web.Request) -> web.StreamResponse:
        exec_id = request.match_info["id"]
        if exec_id == "gone":
            return self.error(404, "No such exec instance: gone", "no such exec session")
        ex = self.execs[exec_id]
        body = await request.json()
        assert body == {"Detach": False, "Tty": False}
        assert request.headers.get("Upgrade") == "tcp"
        assert "upgrade" in request.headers.get("Connection", "").lower()
        resp = web.StreamResponse(
            status=101,
            reason="UPGRADED",
            headers={
                "Content-Type": "application/vnd.docker.multiplexed-stream",
                "Connection": "Upgrade",
                "Upgrade": "tcp",
            },
        )
        await resp.prepare(request)
        stdin = await _raw_stdin(request) if ex.stdin else b""
        script = " ".join(ex.cmd)
        frames = [
            encode_frame(Stream.STDOUT, b"hello\n"),
            encode_frame(Stream.STDERR, b"oops\n"),
        ]
        if stdin:
            frames.append(encode_frame(Stream.STDOUT, b"stdin:" + stdin))
        if "systemerr" in script:
            frames.append(encode_frame(Stream.SYSTEMERR, b"exec failed: no such file\n"))
        data = b"".join(frames)
        transport = request.transport
        assert transport is not None
        for i in range(len(data)):  # one byte at a time: every boundary is a split
            transport.write(data[i : i + 1])
            await asyncio.sleep(0)
        ex.started = True
        transport.close()
        return resp

    async def exec_inspect(self, request: web.Request) -> web.Response:
        ex = self.execs[request.match_info["id"]]
        ex.inspects += 1
        # Engines may still say Running right after the stream closed.
        running = ex.inspects < 3
        code = None if running else int(ex.cmd[-1]) if ex.cmd[-1].isdigit() else 0
        return web.json_response({"Running": running, "ExitCode": code})

    async def volume_remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "busy":
            return self.error(
                409,
                "remove busy: volume is in use",
                "volume is being used",
                podman_status=500,
            )
        if name == "weird":
            return web.Response(status=500, text="plain text failure\n")
        return web.Response(status=204)

    async def network_create(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body["Internal"] is True and body["Labels"] == {"keyward.test": "1"}
        return web.json_response({"Id": "net1", "Warning": ""}, status=201)


async def _raw_stdin(request: web.Request) -> bytes:
    """Bytes the client sent after the upgrade, until its half-close.

    aiohttp closes a connection when the peer half-closes; engines keep writing output. Wrap the
    transport's protocol so EOF only ends stdin, and take the raw bytes the way aiohttp's own
    websocket support does (a parser object fed everything after the upgrade).
    """
    reader = asyncio.StreamReader()
    inner = request.protocol

    class Tail:
        def feed_data(self, data: bytes) -> tuple[bool, bytes]:
            reader.feed_data(data)
            return False, b""

        def feed_eof(self) -> None:
            reader.feed_eof()

    class HalfCloseOk(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            inner.data_received(data)

        def eof_received(self) -> bool:
            reader.feed_eof()
            return True  # keep our side open for output

        def connection_lost(self, exc: Exception | None) -> None:
            inner.connection_lost(exc)

        def pause_writing(self) -> None:
            inner.pause_writing()

        def resume_writing(self) -> None:
            inner.resume_writing()

    assert request.transport is not None
    request.transport.set_protocol(HalfCloseOk())
    inner.set_parser(Tail())  # type: ignore[arg-type]
    return await asyncio.wait_for(reader.read(), 10)


@dataclass
class Served:
    engine: FakeEngine
    socket: Path


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """Start fake engines on short unix socket paths; everything is torn down afterwards."""
    base = Path(tempfile.mkdtemp(prefix="kw-fake-"))
    runners: list[web.AppRunner] = []

    async def start(engine: FakeEngine, name: str = "engine.sock") -> Served:
        runner = web.AppRunner(engine.app())
        await runner.setup()
        runners.append(runner)
        path = base / name
        await web.UnixSite(runner, str(path)).start()
        return Served(engine, path)

    try:
        yield start
    finally:
        for r in runners:
            await r.cleanup()
        shutil.rmtree(base, ignore_errors=True)


# --- kind and version ---------------------------------------------------------------------------


async def test_kind_comes_from_headers_not_the_path(serve: Callable[..., Any]) -> None:
    podman = await serve(FakeEngine(kind="podman"), "docker.sock")
    docker = await serve(FakeEngine(kind="docker"), "podman.sock")
    async with EngineClient(podman.socket) as c:
        ping = await c.ping()
        assert (ping.kind, ping.libpod_api_version) == ("podman", "5.2.0")
    async with EngineClient(docker.socket) as c:
        ping = await c.ping()
        assert (ping.kind, ping.api_version, ping.libpod_api_version) == ("docker", "1.41", None)


@pytest.mark.parametrize(
    ("api", "min_api", "expected"),
    [
        ("1.52", "1.44", "1.47"),  # Docker 29: refuses anything below 1.44
        ("1.43", "1.12", "1.43"),  # Docker 24: refuses 1.44
        ("1.41", "1.24", "1.41"),  # Podman 4/5 compat API
        ("1.60", "1.50", "1.50"),  # a future engine whose floor is above our ceiling
    ],
)
async def test_version_negotiation(
    serve: Callable[..., Any], api: str, min_api: str, expected: str
) -> None:
    s = await serve(FakeEngine(api=api, min_api=min_api))
    async with EngineClient(s.socket) as c:
        await c.container_inspect("box")
        assert c.api_version == expected
        assert c.server_api_versions == (api, min_api)
    assert s.engine.paths[-1] == f"/v{expected}/containers/box/json"
    assert s.engine.paths.count("/version") == 1  # negotiated once


@pytest.mark.parametrize(
    ("api", "min_api", "forced"), [("1.52", "1.44", "1.41"), ("1.43", "1.12", "1.44")]
)
async def test_fake_enforces_the_window(
    serve: Callable[..., Any], api: str, min_api: str, forced: str
) -> None:
    """Without negotiation the same calls fail: the cases above are real failures avoided."""
    s = await serve(FakeEngine(api=api, min_api=min_api))
    async with EngineClient(s.socket, api_version=forced) as c:
        with pytest.raises(BadRequest, match=r"too (old|new)"):
            await c.container_inspect("box")


def test_negotiate_version_numeric() -> None:
    assert negotiate_version("1.9", None, "1.10") == "1.9"
    assert negotiate_version(None, None) == "1.24"
    assert split_ref("registry:5000/a/b:tag") == ("registry:5000/a/b", "tag")
    assert split_ref("registry:5000/a/b") == ("registry:5000/a/b", "latest")


@pytest.mark.parametrize("kind", ["docker", "podman"])
@pytest.mark.parametrize("rootless", [True, False])
async def test_rootless(serve: Callable[..., Any], kind: str, rootless: bool) -> None:
    s = await serve(FakeEngine(kind=kind, rootless=rootless))
    async with EngineClient(s.socket) as c:
        assert await c.is_rootless() is rootless
    if kind == "podman":
        assert "/v5.2.0/libpod/info" in s.engine.paths


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["docker", "podman"])
async def test_error_mapping(serve: Callable[..., Any], kind: str) -> None:
    s = await serve(FakeEngine(kind=kind))
    async with EngineClient(s.socket) as c:
        with pytest.raises(NotFound) as nf:
            await c.container_inspect("missing")
        assert "missing" in nf.value.message
        with pytest.raises(NotFound) as img:  # Podman: 500 + cause "no such image"
            await c.image_inspect("localhost/none:1")
        if kind == "podman":
            assert (img.value.status, img.value.cause) == (500, "no such image")
        with pytest.raises(Conflict, match="already in use"):  # Podman: 500
            await c.container_create("taken", {"Image": "x"})
        with pytest.raises(BadRequest, match="invalid"):  # Podman: 500
            await c.container_create("ok", {"Image": "bad-config"})
        with pytest.raises(ServerError, match="runtime exploded"):
            await c.container_create("ok", {"Image": "explodes"})
        with pytest.raises(Conflict):
            await c.volume_remove("busy")
        with pytest.raises(ServerError, match="plain text failure"):
            await c.volume_remove("weird")
        await c.volume_remove("fine")


async def test_dead_socket_is_engine_unavailable(serve: Callable[..., Any]) -> None:
    s = await serve(FakeEngine())
    async with EngineClient(s.socket.with_name("nobody.sock")) as c:
        with pytest.raises(EngineUnavailable):
            await c.ping()


# --- progress streams ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["docker", "podman"])
async def test_pull_error_inside_200_stream(serve: Callable[..., Any], kind: str) -> None:
    s = await serve(FakeEngine(kind=kind))
    seen: list[dict[str, Any]] = []
    async with EngineClient(s.socket) as c:
        with pytest.raises(EngineError) as err:
            await c.image_pull("example.test/broken:1", progress=seen.append)
        assert ("manifest unknown" if kind == "docker" else "pinging container registry") in str(
            err.value
        )
        assert [i.get("status") for i in seen] == [
            "Pulling from example.test/broken",
            "Downloading",
        ]
        items = await c.image_pull("example.test/fine:2")
        assert items[-1]["status"].startswith("Status: Downloaded")
        assert (await c.image_inspect("example.test/fine:2"))["Id"].startswith("sha256:cd")


@pytest.mark.parametrize("kind", ["docker", "podman"])
async def test_build_error_inside_200_stream_and_streamed_context(
    serve: Callable[..., Any], kind: str
) -> None:
    s = await serve(FakeEngine(kind=kind))

    async def context() -> AsyncIterator[bytes]:
        for piece in (b"TAR", b"-part-", b"two"):
            yield piece

    async with EngineClient(s.socket) as c:
        with pytest.raises(EngineError, match="returned a non-zero code: 7") as err:
            await c.image_build(b"TARctx", "localhost/x:1", {"FAIL": "1"})
        assert not isinstance(err.value, NotFound)
        lines: list[dict[str, Any]] = []
        image_id = await c.image_build(
            context(), "localhost/x:2", {"A": "b"}, progress=lines.append
        )
        assert image_id == "sha256:" + "ef" * 32
        assert lines[0] == {"stream": "Step 1/2 : FROM scratch\n"}
    assert s.engine.build_bodies == [b"TARctx", b"TAR-part-two"]


@pytest.mark.parametrize("drops_name", [False, True])
async def test_import_names_the_image(serve: Callable[..., Any], drops_name: bool) -> None:
    s = await serve(FakeEngine(kind="podman", drops_import_name=drops_name))
    async with EngineClient(s.socket) as c:
        image_id = await c.image_import(b"TAR rootfs", "localhost/kw:bb")
        assert (await c.image_inspect("localhost/kw:bb"))["Id"] == image_id


# --- multiplexed streams ------------------------------------------------------------------------


async def test_logs_demultiplexed_across_awkward_splits(serve: Callable[..., Any]) -> None:
    s = await serve(FakeEngine())
    async with EngineClient(s.socket) as c:
        got: dict[Stream, bytes] = {Stream.STDOUT: b"", Stream.STDERR: b""}
        async for stream, data in c.container_logs("box", follow=True):
            got[stream] += data
        assert got[Stream.STDOUT] == b"line one\n" + b"x" * 70000 + b"\n"
        assert got[Stream.STDERR] == b"warning: two\nlast\n"

        raw = [chunk async for chunk in c.container_logs("ttybox")]
        assert {st for st, _ in raw} == {Stream.STDOUT}
        assert b"".join(d for _, d in raw) == b"\x1b[1mraw tty bytes\r\n"

        with pytest.raises(StreamError, match="inside a frame"):
            async for _ in c.container_logs("truncated"):
                pass


async def test_exec_hijack_stdout_stderr_and_exit_code(serve: Callable[..., Any]) -> None:
    s = await serve(FakeEngine())
    async with EngineClient(s.socket) as c:
        r = await c.exec_run("box", ["sh", "-c", "exit", "3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"hello\n", b"oops\n")
        assert s.engine.execs["exec0"].inspects == 3  # polled past "still running"

        r = await c.exec_run("box", ["cat", "0"], stdin=b"data for cat")
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"hello\nstdin:data for cat", b"oops\n")

        async with await c.exec_stream("box", ["tail", "5"]) as ex:
            frames = [f async for f in ex]
        assert frames == [(Stream.STDOUT, b"hello\n"), (Stream.STDERR, b"oops\n")]
        assert ex.exit_code == 5

        with pytest.raises(EngineError, match="exec failed"):
            await c.exec_run("box", ["systemerr", "1"])
        with pytest.raises(NotFound):
            await c.exec_run("missing", ["true"])
        with pytest.raises(NotFound, match=r"(?i)no such exec"):
            await c.exec_run("vanishing", ["true"])


async def test_network_create_internal_with_labels(serve: Callable[..., Any]) -> None:
    s = await serve(FakeEngine())
    async with EngineClient(s.socket) as c:
        assert await c.network_create("n", internal=True, labels={"keyward.test": "1"}) == "net1"


async def test_cli_describes_a_fake_podman(serve: Callable[..., Any]) -> None:
    s = await serve(FakeEngine(kind="podman", api="1.41", min_api="1.24", rootless=True))

    async def keyward_engine(*args: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "engine",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(s.socket.parent)},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        return out

    facts = json.loads(await keyward_engine("--engine-socket", f"unix://{s.socket}", "--json"))
    assert facts["kind"] == "podman"
    assert facts["found_by"] == "--engine-socket"
    assert facts["api_version"] == "1.41"
    assert facts["engine_version"] == "podman-fake-1"
    assert facts["rootless"] is True

    text = (await keyward_engine("--engine-socket", str(s.socket))).decode()
    for piece in ("podman", "--engine-socket", "1.41", "rootless", "yes"):
        assert piece in text


# --- the demuxer alone --------------------------------------------------------------------------


frames_st = st.lists(
    st.tuples(st.sampled_from([Stream.STDOUT, Stream.STDERR]), st.binary(min_size=1, max_size=300)),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(min_value=0, max_value=7000), max_size=40))
def test_demuxer_any_split(frames: list[tuple[Stream, bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_frame(s, p) for s, p in frames)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    demux = FrameDemuxer()
    out: list[tuple[Stream, bytes]] = []
    for piece in pieces:
        out.extend(demux.feed(piece))
    demux.close()
    assert out == frames


@given(payload=st.binary(min_size=1, max_size=50), cut=st.integers(min_value=1, max_value=57))
def test_demuxer_partial_frame_at_end_is_an_error(payload: bytes, cut: int) -> None:
    data = encode_frame(Stream.STDOUT, payload)
    cut = min(cut, len(data) - 1)
    demux = FrameDemuxer()
    demux.feed(data[:cut])
    assert demux.pending == cut
    with pytest.raises(StreamError):
        demux.close()


def test_demuxer_rejects_a_raw_stream() -> None:
    with pytest.raises(StreamError, match="not a multiplexed stream"):
        FrameDemuxer().feed(b"hello world, this is tty output")
