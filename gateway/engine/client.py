"""Async client for the Docker-compatible engine API (Docker and Podman) over a unix socket.

Why our own and not docker-py: it is sync, guesses the engine from the socket path, and does not
surface the two engines' error shapes the same way. This client asks the engine what it is
(`/_ping` headers), negotiates the API version (Docker 29 rejects < 1.44, Docker <= 24 rejects
1.44), raises typed errors for both error body shapes, treats an error inside a 200 progress stream
as an error, and demultiplexes exec/log streams itself.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiohttp

from gateway.engine.errors import (
    EngineError,
    EngineUnavailable,
    NotFound,
    StreamError,
    error_from_response,
    error_from_stream,
)
from gateway.engine.stream import FrameDemuxer, Stream

# Newest API whose request/response shapes this client is written against.
MAX_API_VERSION = "1.47"
# What to assume when /version does not say (very old engines).
FALLBACK_API_VERSION = "1.24"
DEFAULT_TIMEOUT = 120.0
CONNECT_TIMEOUT = 10.0
_READ_CHUNK = 65536
_MAX_ERROR_BODY = 65536

EngineKind = Literal["docker", "podman"]
ProgressCallback = Callable[[dict[str, Any]], object]
Filters = Mapping[str, Sequence[str] | str]
Stdin = bytes | AsyncIterable[bytes]
BuildContext = bytes | AsyncIterable[bytes]


def parse_version(v: str) -> tuple[int, ...]:
    """'1.41' → (1, 41): compare API versions numerically, not as strings ('1.9' < '1.10')."""
    parts: list[int] = []
    for piece in v.strip().lstrip("v").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def negotiate_version(
    server_api: str | None, server_min: str | None, our_max: str = MAX_API_VERSION
) -> str:
    """The server's API version capped at ours, but never below what the server accepts."""
    chosen = server_api or FALLBACK_API_VERSION
    if parse_version(chosen) > parse_version(our_max):
        chosen = our_max
    if server_min and parse_version(chosen) < parse_version(server_min):
        chosen = server_min
    return chosen


def split_ref(ref: str) -> tuple[str, str]:
    """'registry:5000/a/b:tag' → ('registry:5000/a/b', 'tag'); no tag → 'latest'."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


def rootless_from_info(info: Mapping[str, Any]) -> bool:
    """Rootless or not, from Podman's libpod info or Docker's /info."""
    host = info.get("host")
    if isinstance(host, Mapping):
        security = host.get("security")
        if isinstance(security, Mapping) and "rootless" in security:
            return bool(security["rootless"])
    opts = info.get("SecurityOptions") or []
    return any("name=rootless" in str(o).split(",") for o in opts)


def _filters_param(filters: Filters | None) -> dict[str, str]:
    if not filters:
        return {}
    norm = {k: [v] if isinstance(v, str) else list(v) for k, v in filters.items()}
    return {"filters": json.dumps(norm)}


def _bool(v: bool) -> str:
    return "true" if v else "false"


@dataclass(frozen=True)
class Ping:
    """What answered on the socket, from `/_ping` headers (never from the socket path)."""

    kind: EngineKind
    api_version: str | None
    libpod_api_version: str | None = None


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class _JsonStream:
    """Incremental decoder for concatenated or newline-delimited JSON objects."""

    def __init__(self) -> None:
        self._buf = ""
        self._dec = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> list[Any]:
        self._buf += self._utf8.decode(data)
        out: list[Any] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return out
            try:
                obj, end = self._dec.raw_decode(text)
            except ValueError:
                self._buf = text  # incomplete: wait for more bytes
                return out
            out.append(obj)
            self._buf = text[end:]

    def rest(self) -> str:
        return self._buf.strip()


class ExecStream:
    """Output of a running exec as `(Stream, bytes)` frames; `exit_code` once the stream ends.

    Use as `async with await client.exec_stream(...) as ex: async for stream, data in ex: ...`,
    then read `ex.exit_code`. Leaving the block early closes the connection.
    """

    def __init__(
        self,
        client: EngineClient,
        exec_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stdin: Stdin | None,
        tty: bool = False,
    ) -> None:
        self._client = client
        self.exec_id = exec_id
        self.tty = tty
        self._reader = reader
        self._writer = writer
        self._stdin_task: asyncio.Task[None] | None = None
        if stdin is not None:
            self._stdin_task = asyncio.ensure_future(self._send_stdin(stdin))
        self.exit_code: int | None = None

    async def _send_stdin(self, data: Stdin) -> None:
        """Copy stdin as it arrives (bytes, or chunks from an async iterable), then half-close."""
        try:
            if isinstance(data, bytes):
                if data:
                    self._writer.write(data)
                    await self._writer.drain()
            else:
                async for chunk in data:
                    self._writer.write(chunk)
                    await self._writer.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()  # half-close: the engine closes the process's stdin
        except (ConnectionError, OSError):
            pass  # the process exited without reading all of stdin

    async def __aenter__(self) -> ExecStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stdin_task is not None and not self._stdin_task.done():
            self._stdin_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stdin_task
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def resize(self, height: int, width: int) -> None:
        """Tell the engine the terminal's size (TTY execs; like `docker exec -t` on SIGWINCH)."""
        await self._client.exec_resize(self.exec_id, height, width)

    async def __aiter__(self) -> AsyncIterator[tuple[Stream, bytes]]:
        demux = FrameDemuxer()
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    break
                if self.tty:  # one raw stream, no frames
                    yield Stream.STDOUT, data
                    continue
                for stream, payload in demux.feed(data):
                    if stream == Stream.SYSTEMERR:
                        raise EngineError(
                            0,
                            payload.decode("utf-8", "replace").strip(),
                            operation=f"exec {self.exec_id[:12]}",
                        )
                    yield stream, payload
            demux.close()
        finally:
            await self.aclose()
        self.exit_code = await self._client._exec_exit_code(self.exec_id)


class EngineClient:
    """One engine, one aiohttp session over its unix socket: `async with EngineClient(p) as c`."""

    def __init__(
        self,
        socket_path: str | Path,
        *,
        api_version: str | None = None,
        max_api_version: str = MAX_API_VERSION,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.socket_path = str(socket_path)
        self.max_api_version = max_api_version
        self.timeout = timeout
        self._api: str | None = api_version
        self._server_api: str | None = None
        self._server_min: str | None = None
        self._ping: Ping | None = None
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> EngineClient:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT),
            )
        return self._session

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def api_version(self) -> str | None:
        """The negotiated API version (None until the first versioned call or `negotiate()`)."""
        return self._api

    @property
    def server_api_versions(self) -> tuple[str | None, str | None]:
        """(max, min) API versions the server reported, once negotiated."""
        return self._server_api, self._server_min

    async def negotiate(self) -> str:
        """Ask `/version` once and pick the API version every later call is prefixed with."""
        async with self._lock:
            if self._api is None:
                data = await self._json("GET", "/version", versioned=False)
                self._server_api = data.get("ApiVersion")
                self._server_min = data.get("MinAPIVersion")
                self._api = negotiate_version(
                    self._server_api, self._server_min, self.max_api_version
                )
            return self._api

    async def _path(self, path: str, versioned: bool) -> str:
        if not versioned:
            return path
        return f"/v{await self.negotiate()}{path}"

    @contextlib.asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        versioned: bool = True,
        timeout: float | None = -1.0,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with status < 400; typed errors otherwise. timeout=None: no limit."""
        session = self._ensure_session()
        full = await self._path(path, versioned)
        op = f"{method} {path}"
        limit = self.timeout if timeout is not None and timeout < 0 else timeout
        try:
            async with session.request(
                method,
                f"http://localhost{full}",
                params=params,
                json=json_body,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit, connect=CONNECT_TIMEOUT),
            ) as resp:
                if resp.status >= 400:
                    body = await resp.content.read(_MAX_ERROR_BODY)
                    raise error_from_response(resp.status, body, operation=op)
                yield resp
        except aiohttp.ClientConnectionError as e:
            raise EngineUnavailable(0, f"{self.socket_path}: {e}", operation=op) from None
        except aiohttp.ClientPayloadError as e:
            raise StreamError(0, f"response body cut off: {e}", operation=op) from None
        except TimeoutError:
            raise EngineUnavailable(0, f"no answer within {limit}s", operation=op) from None

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        async with self._open(method, path, **kw) as resp:
            raw = await resp.read()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineError(
                resp.status,
                f"engine answered non-JSON: {raw[:200]!r}",
                operation=f"{method} {path}",
            ) from None

    async def _object(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """`_json` for the endpoints that answer one JSON object."""
        data = await self._json(method, path, **kw)
        if not isinstance(data, dict):
            raise EngineError(
                0,
                f"engine answered {type(data).__name__}, not a JSON object",
                operation=f"{method} {path}",
            )
        return data

    async def _none(self, method: str, path: str, **kw: Any) -> None:
        async with self._open(method, path, **kw) as resp:
            await resp.read()

    async def _progress(
        self, method: str, path: str, progress: ProgressCallback | None, **kw: Any
    ) -> list[dict[str, Any]]:
        """Read a JSON progress stream; an error object inside it raises even though it was 200."""
        op = f"{method} {path}"
        items: list[dict[str, Any]] = []
        decoder = _JsonStream()
        async with self._open(method, path, timeout=None, **kw) as resp:
            async for chunk in resp.content.iter_any():
                for item in decoder.feed(chunk):
                    if not isinstance(item, dict):
                        continue
                    err = error_from_stream(item, operation=op)
                    if err is not None:
                        raise err
                    items.append(item)
                    if progress is not None:
                        progress(item)
        if decoder.rest():
            raise StreamError(0, f"progress stream ended mid-object: {decoder.rest()[:200]!r}")
        return items

    # -- system --------------------------------------------------------------------------------

    async def ping(self) -> Ping:
        """Who answers: Podman sets `Libpod-Api-Version`, Docker does not."""
        async with self._open("GET", "/_ping", versioned=False) as resp:
            await resp.read()
            libpod = resp.headers.get("Libpod-Api-Version")
            self._ping = Ping(
                kind="podman" if libpod else "docker",
                api_version=resp.headers.get("Api-Version"),
                libpod_api_version=libpod,
            )
        return self._ping

    async def version(self) -> dict[str, Any]:
        return await self._object("GET", "/version", versioned=False)

    async def info(self) -> dict[str, Any]:
        return await self._object("GET", "/info")

    async def engine_info(self) -> dict[str, Any]:
        """Podman's libpod `/info` (host.security, cgroups, version) or Docker's `/info`."""
        ping = self._ping or await self.ping()
        if ping.kind == "podman" and ping.libpod_api_version:
            return await self._object(
                "GET", f"/v{ping.libpod_api_version}/libpod/info", versioned=False
            )
        return await self.info()

    async def is_rootless(self) -> bool:
        """Podman: libpod info `host.security.rootless`; Docker: `name=rootless` security option."""
        return rootless_from_info(await self.engine_info())

    # -- images --------------------------------------------------------------------------------

    async def image_inspect(self, ref: str) -> dict[str, Any]:
        return await self._object("GET", f"/images/{ref}/json")

    async def image_pull(
        self,
        ref: str,
        *,
        progress: ProgressCallback | None = None,
        registry_auth: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        image, tag = split_ref(ref) if "@" not in ref else (ref, "")
        params = {"fromImage": image}
        if tag:
            params["tag"] = tag
        headers = {}
        if registry_auth:
            raw = json.dumps(dict(registry_auth)).encode()
            headers["X-Registry-Auth"] = base64.urlsafe_b64encode(raw).decode()
        return await self._progress(
            "POST", "/images/create", progress, params=params, headers=headers
        )

    async def image_build(
        self,
        context: BuildContext,
        tag: str,
        buildargs: Mapping[str, str] | None = None,
        *,
        progress: ProgressCallback | None = None,
        dockerfile: str | None = None,
        labels: Mapping[str, str] | None = None,
        network_mode: str | None = None,
        nocache: bool = False,
        pull: bool = False,
    ) -> str:
        """Build from a tar context (bytes or async chunks); returns the image id."""
        params = {"t": tag, "rm": "true", "forcerm": "true", "nocache": _bool(nocache)}
        if pull:
            params["pull"] = "true"
        if buildargs:
            params["buildargs"] = json.dumps(dict(buildargs))
        if labels:
            params["labels"] = json.dumps(dict(labels))
        if dockerfile:
            params["dockerfile"] = dockerfile
        if network_mode:
            params["networkmode"] = network_mode
        await self._progress(
            "POST",
            "/build",
            progress,
            params=params,
            data=context,
            headers={"Content-Type": "application/x-tar"},
        )
        return str((await self.image_inspect(tag))["Id"])

    async def image_import(
        self,
        tar: BuildContext,
        ref: str,
        *,
        changes: Sequence[str] = (),
        progress: ProgressCallback | None = None,
    ) -> str:
        """Create an image from a root filesystem tar (like `docker import`); returns its id."""
        # `repo` may carry the tag; Podman 4.3 ignores a separate `tag` parameter.
        params: list[tuple[str, str]] = [("fromSrc", "-"), ("repo", ref)]
        params += [("changes", c) for c in changes]
        items = await self._progress(
            "POST",
            "/images/create",
            progress,
            params=params,
            data=tar,
            headers={"Content-Type": "application/x-tar"},
        )
        try:
            return str((await self.image_inspect(ref))["Id"])
        except NotFound:
            new_id = next(
                (
                    str(i.get("status"))
                    for i in reversed(items)
                    if "sha256:" in str(i.get("status"))
                ),
                None,
            )
            if new_id is None:
                raise
        await self.image_tag(new_id, ref)  # engines that dropped the name: name it ourselves
        return new_id

    async def image_tag(self, image: str, ref: str) -> None:
        repo, tag = split_ref(ref)
        await self._none("POST", f"/images/{image}/tag", params={"repo": repo, "tag": tag})

    async def image_list(self, filters: Filters | None = None) -> list[dict[str, Any]]:
        return list(await self._json("GET", "/images/json", params=_filters_param(filters)) or [])

    async def image_remove(self, ref: str, *, force: bool = False) -> list[dict[str, Any]]:
        return await self._json("DELETE", f"/images/{ref}", params={"force": _bool(force)}) or []

    # -- volumes -------------------------------------------------------------------------------

    async def volume_create(
        self, name: str, *, labels: Mapping[str, str] | None = None, driver: str = "local"
    ) -> dict[str, Any]:
        body = {"Name": name, "Driver": driver, "Labels": dict(labels or {})}
        return await self._object("POST", "/volumes/create", json_body=body)

    async def volume_inspect(self, name: str) -> dict[str, Any]:
        return await self._object("GET", f"/volumes/{name}")

    async def volume_remove(self, name: str, *, force: bool = False) -> None:
        await self._none("DELETE", f"/volumes/{name}", params={"force": _bool(force)})

    async def volume_list(self, filters: Filters | None = None) -> list[dict[str, Any]]:
        data = await self._json("GET", "/volumes", params=_filters_param(filters))
        return list((data or {}).get("Volumes") or [])

    # -- networks ------------------------------------------------------------------------------

    async def network_create(
        self,
        name: str,
        *,
        internal: bool = False,
        labels: Mapping[str, str] | None = None,
        driver: str = "bridge",
        options: Mapping[str, str] | None = None,
    ) -> str:
        """Create a network; `internal=True` = no route out of it. Returns its id."""
        body: dict[str, Any] = {
            "Name": name,
            "Driver": driver,
            "Internal": internal,
            "Labels": dict(labels or {}),
        }
        if options:
            body["Options"] = dict(options)
        data = await self._json("POST", "/networks/create", json_body=body)
        return str(data["Id"])

    async def network_inspect(self, name: str) -> dict[str, Any]:
        return await self._object("GET", f"/networks/{name}")

    async def network_connect(
        self, network: str, container: str, *, aliases: Sequence[str] = ()
    ) -> None:
        body: dict[str, Any] = {"Container": container}
        if aliases:
            body["EndpointConfig"] = {"Aliases": list(aliases)}
        await self._none("POST", f"/networks/{network}/connect", json_body=body)

    async def network_disconnect(
        self, network: str, container: str, *, force: bool = False
    ) -> None:
        body = {"Container": container, "Force": force}
        await self._none("POST", f"/networks/{network}/disconnect", json_body=body)

    async def network_remove(self, name: str) -> None:
        await self._none("DELETE", f"/networks/{name}")

    async def network_list(self, filters: Filters | None = None) -> list[dict[str, Any]]:
        return list(await self._json("GET", "/networks", params=_filters_param(filters)) or [])

    # -- containers ----------------------------------------------------------------------------

    async def container_create(self, name: str | None, config: Mapping[str, Any]) -> str:
        """Create from a Docker-API config dict (Image, Cmd, Labels, HostConfig...); returns id."""
        params = {"name": name} if name else {}
        data = await self._json("POST", "/containers/create", params=params, json_body=config)
        return str(data["Id"])

    async def container_start(self, container: str) -> None:
        await self._none("POST", f"/containers/{container}/start")

    async def container_inspect(self, container: str) -> dict[str, Any]:
        return await self._object("GET", f"/containers/{container}/json")

    async def container_wait(self, container: str, *, condition: str = "not-running") -> int:
        """Block until the container stops; its exit status. No time limit (use wait_for)."""
        data = await self._json(
            "POST",
            f"/containers/{container}/wait",
            params={"condition": condition},
            timeout=None,
        )
        err = (data or {}).get("Error")
        if isinstance(err, dict) and err.get("Message"):
            raise EngineError(0, str(err["Message"]), operation=f"wait {container}")
        return int((data or {}).get("StatusCode", -1))

    async def container_stop(self, container: str, *, timeout: int = 10) -> None:
        await self._none(
            "POST",
            f"/containers/{container}/stop",
            params={"t": str(timeout)},
            timeout=self.timeout + timeout,
        )

    async def container_kill(self, container: str, *, signal: str = "SIGKILL") -> None:
        await self._none("POST", f"/containers/{container}/kill", params={"signal": signal})

    async def container_remove(
        self, container: str, *, force: bool = False, volumes: bool = False
    ) -> None:
        params = {"force": _bool(force), "v": _bool(volumes)}
        await self._none("DELETE", f"/containers/{container}", params=params)

    async def container_list(
        self, filters: Filters | None = None, *, all: bool = True
    ) -> list[dict[str, Any]]:
        params = {"all": _bool(all), **_filters_param(filters)}
        return list(await self._json("GET", "/containers/json", params=params) or [])

    async def container_logs(
        self,
        container: str,
        *,
        follow: bool = False,
        stdout: bool = True,
        stderr: bool = True,
        tail: int | None = None,
        since: int | None = None,
        tty: bool | None = None,
    ) -> AsyncIterator[tuple[Stream, bytes]]:
        """Log output as (Stream, bytes); TTY containers have one raw stream (reported STDOUT).

        The connection is held until the iterator ends; wrap it in `contextlib.aclosing` when
        leaving a followed stream early.
        """
        if tty is None:
            tty = bool((await self.container_inspect(container)).get("Config", {}).get("Tty"))
        params = {"stdout": _bool(stdout), "stderr": _bool(stderr), "follow": _bool(follow)}
        if tail is not None:
            params["tail"] = str(tail)
        if since is not None:
            params["since"] = str(since)
        demux = FrameDemuxer()
        async with self._open(
            "GET", f"/containers/{container}/logs", params=params, timeout=None
        ) as resp:
            async for chunk in resp.content.iter_any():
                if tty:
                    yield Stream.STDOUT, chunk
                    continue
                for frame in demux.feed(chunk):
                    yield frame
        demux.close()

    async def put_archive(self, container: str, path: str, tar: bytes) -> None:
        """Unpack a tar into the container's filesystem at `path` (which must exist)."""
        await self._none(
            "PUT",
            f"/containers/{container}/archive",
            params={"path": path},
            data=tar,
            headers={"Content-Type": "application/x-tar"},
        )

    async def path_stat(self, container: str, path: str) -> dict[str, Any]:
        """`path`'s stat in the container (name, size, mode, linkTarget: the path a symlink
        resolves to); NotFound when there is no such path."""
        async with self._open(
            "HEAD", f"/containers/{container}/archive", params={"path": path}
        ) as resp:
            raw = resp.headers.get("X-Docker-Container-Path-Stat", "")
        try:
            stat = json.loads(base64.b64decode(raw))
        except ValueError:
            stat = None
        if not isinstance(stat, dict):
            raise EngineError(resp.status, "no path stat in the answer", operation=f"HEAD {path}")
        return stat

    async def get_archive(self, container: str, path: str) -> bytes:
        """A tar of `path` in the container's filesystem (a symlink: Docker sends the link,
        Podman the file); NotFound when there is no such path. Works before the first start."""
        async with self._open(
            "GET", f"/containers/{container}/archive", params={"path": path}
        ) as resp:
            return await resp.read()

    # -- exec ----------------------------------------------------------------------------------

    async def exec_create(
        self,
        container: str,
        argv: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
        workdir: str | None = None,
        tty: bool = False,
    ) -> str:
        body: dict[str, Any] = {
            "AttachStdin": stdin,
            "AttachStdout": True,
            "AttachStderr": True,
            "Tty": tty,
            "Cmd": list(argv),
        }
        if user is not None:
            body["User"] = user
        if env:
            body["Env"] = [f"{k}={v}" for k, v in env.items()]
        if workdir:
            body["WorkingDir"] = workdir
        data = await self._json("POST", f"/containers/{container}/exec", json_body=body)
        return str(data["Id"])

    async def exec_resize(self, exec_id: str, height: int, width: int) -> None:
        await self._none(
            "POST", f"/exec/{exec_id}/resize", params={"h": str(height), "w": str(width)}
        )

    async def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return await self._object("GET", f"/exec/{exec_id}/json")

    async def _exec_exit_code(self, exec_id: str, wait: float = 10.0) -> int:
        """The exit code; engines may report Running for a moment after the stream closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.01
        while True:
            data = await self.exec_inspect(exec_id)
            code = data.get("ExitCode")
            if not data.get("Running") and code is not None:
                return int(code)
            if loop.time() > deadline:
                raise EngineError(0, "exec stream ended but the process is still running")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _hijack(
        self, path: str, body: Mapping[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """POST with `Upgrade: tcp` and take over the raw connection (aiohttp cannot do this).

        The engine answers 101 (or 200 on old engines) and from then on the socket carries the
        process's multiplexed output one way and its stdin the other.
        """
        full = await self._path(path, True)
        op = f"POST {path}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            raise EngineUnavailable(0, f"{self.socket_path}: {e}", operation=op) from None
        try:
            payload = json.dumps(dict(body)).encode()
            head = (
                f"POST {full} HTTP/1.1\r\nHost: localhost\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
            )
            writer.write(head.encode("ascii") + payload)
            await writer.drain()
            status, headers = await asyncio.wait_for(_read_head(reader), self.timeout)
            if status >= 400:
                length = int(headers.get("content-length", "0") or 0)
                err_body = await asyncio.wait_for(
                    reader.read(min(length, _MAX_ERROR_BODY) if length else _MAX_ERROR_BODY),
                    self.timeout,
                )
                raise error_from_response(status, err_body, operation=op)
            if status not in (101, 200):
                raise EngineError(status, "unexpected answer to a hijacked request", operation=op)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise EngineError(status, "engine did not hijack the connection", operation=op)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def exec_stream(
        self,
        container: str,
        argv: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: Stdin | None = None,
        workdir: str | None = None,
        tty: bool = False,
    ) -> ExecStream:
        """Start `argv` in the container; iterate the result for output, then `.exit_code`.
        `stdin` is copied as it arrives; `tty=True` gives one raw output stream."""
        exec_id = await self.exec_create(
            container, argv, user=user, env=env, stdin=stdin is not None, workdir=workdir, tty=tty
        )
        reader, writer = await self._hijack(f"/exec/{exec_id}/start", {"Detach": False, "Tty": tty})
        return ExecStream(self, exec_id, reader, writer, stdin, tty)

    async def exec_run(
        self,
        container: str,
        argv: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        workdir: str | None = None,
    ) -> ExecResult:
        """Run to completion; stdout and stderr kept apart."""
        out = bytearray()
        err = bytearray()
        async with await self.exec_stream(
            container, argv, user=user, env=env, stdin=stdin, workdir=workdir
        ) as ex:
            async for stream, data in ex:
                (err if stream == Stream.STDERR else out).extend(data)
        if ex.exit_code is None:  # the stream was left before its end
            raise StreamError(0, "exec output ended without an exit code")
        return ExecResult(ex.exit_code, bytes(out), bytes(err))


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of a raw HTTP/1.1 response."""
    line = await reader.readline()
    if not line:
        raise EngineUnavailable(0, "engine closed the connection without answering")
    parts = line.decode("latin-1").split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        raise StreamError(0, f"not an HTTP response: {line[:80]!r}") from None
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers
