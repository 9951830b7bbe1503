"""Find the container engine's API socket the way the Docker CLI would, then probe known places.

Order: `--engine-socket` / `KEYWARD_ENGINE_SOCKET`, `DOCKER_HOST`, `CONTAINER_HOST`,
`DOCKER_CONTEXT`, the Docker CLI's current context, then per-OS candidates. A setting the user
made (the first four) is authoritative: if it is dead that is an error, never a silent fallback to
some other engine. The engine's kind is not guessed here: `/var/run/docker.sock` is often Podman,
so the client asks the engine itself (`/_ping` headers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.engine.errors import Attempt, EngineNotFound
from gateway.engine.service import PrivateService, ServiceError, start_private_service

CONNECT_TIMEOUT = 1.0
# A socket that accepts but never answers /_ping (a wedged daemon, a stuck VM forwarder) must not
# hang a command for the client's 120 s: after this long it is "not answering" and skipped.
PING_TIMEOUT = 5.0
# sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS, including the terminating NUL.
MAX_SOCKET_PATH = {"darwin": 103}.get(sys.platform, 107)
ENV_EXPLICIT = "KEYWARD_ENGINE_SOCKET"
PODMAN_MACHINE_CMD = ("podman", "machine", "inspect")


@dataclass(frozen=True)
class Discovery:
    """The socket to use, how it was found, and everything looked at before it; `service` is
    the API service keyward started for it (stop it when done), if it had to."""

    socket_path: Path
    how: str
    tried: tuple[Attempt, ...]
    service: PrivateService | None = None

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()


class _Settled(Exception):
    """An authoritative setting decided the outcome (found or failed); stop looking."""


def socket_path_from_host(value: str) -> Path:
    """`unix:///run/x.sock` or a bare path → Path; other schemes are refused clearly."""
    value = value.strip()
    if value.startswith("unix://"):
        rest = value[len("unix://") :]
        if not rest:
            raise ValueError("unix:// with no path")
        return Path(rest)
    if "://" not in value:
        return Path(value)
    scheme = value.split("://", 1)[0]
    raise ValueError(
        f"{scheme}:// is not supported: keyward talks to engines over unix sockets only "
        "(use unix:///path/to/engine.sock, e.g. forward a remote socket with ssh -L)"
    )


def probe_socket(
    path: Path, timeout: float = CONNECT_TIMEOUT, ping_timeout: float = PING_TIMEOUT
) -> str | None:
    """Why `path` is not a usable engine socket, or None if it answers `GET /_ping`."""
    return probe_kind(path, timeout, ping_timeout)[1]


def probe_kind(
    path: Path, timeout: float = CONNECT_TIMEOUT, ping_timeout: float = PING_TIMEOUT
) -> tuple[str | None, str | None]:
    """("docker" | "podman", None) for a socket that answers `GET /_ping`, else (None, why not).
    Podman answers with a Libpod-Api-Version header; the path says nothing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, "does not exist"
    except PermissionError:
        return None, "permission denied (cannot see it)"
    except OSError as e:
        return None, f"cannot stat: {e.strerror or e}"
    if not stat.S_ISSOCK(st.st_mode):
        return None, "exists but is not a unix socket"
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        return None, f"path too long for a unix socket (over {MAX_SOCKET_PATH} bytes)"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except PermissionError:
        return None, "permission denied (not in the engine's group?)"
    except ConnectionRefusedError:
        return None, "connection refused (stale socket: engine not running)"
    except TimeoutError:
        return None, f"no answer within {timeout:g}s"
    except OSError as e:
        sock.close()
        return None, f"cannot connect: {e.strerror or e}"
    try:
        return _ping(sock, ping_timeout)
    finally:
        sock.close()


def _ping(sock: socket.socket, timeout: float) -> tuple[str | None, str | None]:
    """(kind, None) once the connected `sock` answers /_ping over HTTP, else (None, why not)."""
    sock.settimeout(timeout)
    try:
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        if not head.startswith(b"HTTP/"):  # an answer that started counts, even if it stalls
            return None, f"accepts connections but did not answer /_ping within {timeout:g}s"
    except OSError as e:
        return None, f"/_ping failed: {e.strerror or e}"
    if not head.startswith(b"HTTP/"):
        return None, "answered /_ping with something that is not HTTP"
    headers = head.split(b"\r\n\r\n", 1)[0].lower()
    return ("podman" if b"\r\nlibpod-api-version:" in headers else "docker"), None


def _ready_machine_socket() -> str:
    """macOS: the podman machine made ready (started once if stopped), then its socket."""
    from gateway.engine.machine import machine_socket_text

    return machine_socket_text()


class _Finder:
    def __init__(
        self,
        environ: Mapping[str, str],
        home: Path,
        platform: str,
        uid: int,
        fs_root: Path,
        run_podman_machine: Callable[[], str],
    ) -> None:
        self.env = environ
        self.home = home
        self.platform = platform
        self.uid = uid
        self.root = fs_root
        self.run_podman_machine = run_podman_machine
        self.tried: list[Attempt] = []
        self.seen: set[str] = set()

    def sys_path(self, absolute: str) -> Path:
        """A system path such as /run/docker.sock, under `fs_root` (tests use a fake tree)."""
        return self.root / absolute.lstrip("/")

    def try_path(self, source: str, path: Path, *, authoritative: bool = False) -> Discovery | None:
        key = os.path.realpath(path)  # /var/run is usually /run: probe each socket once
        if key in self.seen and not authoritative:
            return None
        self.seen.add(key)
        reason = probe_socket(path)
        self.tried.append(Attempt(source, str(path), reason))
        if reason is None:
            return Discovery(path, source, tuple(self.tried))
        if authoritative:
            raise _Settled
        return None

    def try_host(self, source: str, value: str, *, authoritative: bool) -> Discovery | None:
        try:
            path = socket_path_from_host(value)
        except ValueError as e:
            self.tried.append(Attempt(source, value, str(e)))
            if authoritative:
                raise _Settled from None
            return None
        return self.try_path(source, path, authoritative=authoritative)

    def docker_config_dir(self) -> Path:
        configured = self.env.get("DOCKER_CONFIG")
        return Path(configured) if configured else self.home / ".docker"

    def context_host(self, name: str, source: str, *, authoritative: bool) -> Discovery | None:
        meta = (
            self.docker_config_dir()
            / "contexts"
            / "meta"
            / hashlib.sha256(name.encode()).hexdigest()
            / "meta.json"
        )
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            host = data["Endpoints"]["docker"]["Host"]
        except FileNotFoundError:
            reason = f"no such docker context (no {meta})"
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"unreadable context metadata {meta}: {e}"
        else:
            if isinstance(host, str) and host:
                return self.try_host(source, host, authoritative=authoritative)
            reason = f"context has no docker endpoint host in {meta}"
        self.tried.append(Attempt(source, name, reason))
        if authoritative:
            raise _Settled
        return None

    def current_context(self) -> str | None:
        cfg = self.docker_config_dir() / "config.json"
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self.tried.append(Attempt("docker config", str(cfg), f"unreadable: {e}"))
            return None
        name = data.get("currentContext") if isinstance(data, dict) else None
        return name if isinstance(name, str) and name else None

    def settings(self, explicit: str | None) -> Discovery | None:
        """User settings, most specific first; the first one present decides."""
        if explicit:
            return self.try_host("--engine-socket", explicit, authoritative=True)
        for var in (ENV_EXPLICIT, "DOCKER_HOST", "CONTAINER_HOST"):
            value = self.env.get(var)
            if value:
                return self.try_host(var, value, authoritative=True)
        name = self.env.get("DOCKER_CONTEXT")
        if name and name != "default":
            return self.context_host(name, f"docker context {name}", authoritative=True)
        if name == "default":
            return None
        name = self.current_context()
        if name and name != "default":
            # Written by installers as often as by the user: recorded, but not authoritative.
            return self.context_host(name, f"docker context {name}", authoritative=False)
        return None

    def candidates(self) -> Iterator[tuple[str, Path]]:
        home = self.home
        if self.platform.startswith("linux"):
            runtime = self.env.get("XDG_RUNTIME_DIR")
            run_user = Path(runtime) if runtime else self.sys_path(f"/run/user/{self.uid}")
            yield "candidate: docker", self.sys_path("/var/run/docker.sock")
            yield "candidate: docker", self.sys_path("/run/docker.sock")
            yield "candidate: rootless docker", run_user / "docker.sock"
            yield "candidate: rootless podman", run_user / "podman" / "podman.sock"
            yield "candidate: rootful podman", self.sys_path("/run/podman/podman.sock")
            yield "candidate: Docker Desktop", home / ".docker/desktop/docker.sock"
            yield "candidate: Colima", home / ".colima/default/docker.sock"
            yield "candidate: Rancher Desktop", home / ".rd/docker.sock"
            yield "candidate: Lima", home / ".lima/default/sock/docker.sock"
        elif self.platform == "darwin":
            yield "candidate: Docker Desktop", home / ".docker/run/docker.sock"
            yield "candidate: docker", self.sys_path("/var/run/docker.sock")
            yield "candidate: OrbStack", home / ".orbstack/run/docker.sock"
            yield "candidate: Colima", home / ".colima/default/docker.sock"
            yield "candidate: Colima", home / ".colima/docker.sock"
            yield "candidate: Rancher Desktop", home / ".rd/docker.sock"
            lima = sorted((home / ".lima").glob("*/sock/docker.sock"))
            if not lima:
                self.tried.append(
                    Attempt("candidate: Lima", str(home / ".lima/*/sock/docker.sock"), "none")
                )
            for path in lima:
                yield f"candidate: Lima {path.parent.parent.name}", path
            yield from self.podman_machine()

    def podman_machine(self) -> Iterator[tuple[str, Path]]:
        source = "candidate: podman machine"
        try:
            out = self.run_podman_machine()
        except (RuntimeError, OSError) as e:
            self.tried.append(Attempt(source, " ".join(PODMAN_MACHINE_CMD), str(e)))
            return
        paths = [line.strip() for line in out.splitlines() if line.strip()]
        if not paths:
            self.tried.append(
                Attempt(source, " ".join(PODMAN_MACHINE_CMD), "no machine socket reported")
            )
        for p in paths:
            yield source, Path(p)

    def find(self, explicit: str | None) -> Discovery:
        try:
            found = self.settings(explicit)
        except _Settled:
            last = self.tried[-1]
            raise EngineNotFound(
                f"engine socket from {last.source} is not usable "
                "(an explicit setting is never replaced by another engine)",
                self.tried,
                authoritative=True,
            ) from None
        if found:
            return found
        for source, path in self.candidates():
            found = self.try_path(source, path)
            if found:
                return found
        if not self.platform.startswith("linux") and self.platform != "darwin":
            self.tried.append(
                Attempt("candidates", self.platform, "no known socket locations for this OS")
            )
        raise EngineNotFound(
            "no container engine socket found (set --engine-socket or DOCKER_HOST)", self.tried
        )


def candidate_sockets(
    *, environ: Mapping[str, str] | None = None, platform: str = sys.platform
) -> list[tuple[str, Path]]:
    """(source, path) of every well-known socket location on this OS, in discovery order, without
    probing any (the podman machine, which may need starting, is left out)."""
    env = os.environ if environ is None else environ
    home_env = env.get("HOME")
    finder = _Finder(
        environ=env,
        home=Path(home_env) if home_env else Path.home(),
        platform=platform,
        uid=os.getuid() if hasattr(os, "getuid") else 0,
        fs_root=Path("/"),
        run_podman_machine=lambda: "",
    )
    return [(s, p) for s, p in finder.candidates() if s != "candidate: podman machine"]


def find_engine(
    *,
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    platform: str = sys.platform,
    uid: int | None = None,
    run_podman_machine: Callable[[], str] | None = None,
    fs_root: Path | None = None,
    fallback: bool = False,
    podman: str | None = None,
) -> Discovery:
    """Find a connectable engine socket or raise `EngineNotFound` listing every place tried.

    `environ`, `home`, `platform`, `uid`, `fs_root` (prefix for system paths) and
    `run_podman_machine` exist so tests can describe any machine; defaults are this one.
    `fallback`: when no socket answers and no setting decided, start a private Podman API
    service (`podman`: its binary, default from PATH) instead of failing.
    """
    env = os.environ if environ is None else environ
    if home is None:
        home_env = env.get("HOME")
        home = Path(home_env) if home_env else Path.home()
    if uid is None:
        with contextlib.suppress(AttributeError):
            uid = os.getuid()
    finder = _Finder(
        environ=env,
        home=home,
        platform=platform,
        uid=uid if uid is not None else 0,
        fs_root=fs_root or Path("/"),
        run_podman_machine=run_podman_machine or _ready_machine_socket,
    )
    try:
        return finder.find(explicit)
    except EngineNotFound as e:
        exe = podman or shutil.which("podman", path=env.get("PATH"))
        if not fallback or e.authoritative or exe is None:
            raise
        try:
            service = start_private_service(podman=exe)
        except ServiceError as err:
            tried = (*e.tried, Attempt("fallback", "podman system service", str(err)))
            raise EngineNotFound(e.summary, tried) from None
        how = f"started: podman system service (pid {service.pid}, private socket)"
        return Discovery(service.socket_path, how, e.tried, service)
