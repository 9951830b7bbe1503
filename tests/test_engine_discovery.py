"""Finding the engine socket: precedence, Docker contexts, per-OS candidates, clear failures.

Every machine layout is a fake directory tree with real unix sockets (listening, stale, or a plain
file where a socket should be), so "connectable" is tested for real, not assumed from a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.engine.discovery import find_engine, probe_socket, socket_path_from_host
from gateway.engine.errors import EngineNotFound

ROOT = Path(__file__).resolve().parent.parent


def _answer_pings(listener: socket.socket) -> None:
    """Answer every connection like an engine's /_ping, until the listener is closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\n\r\nOK")


class Layout:
    """A fake machine: `root` stands for /, `home` for ~; sockets live, stale or fake."""

    def __init__(self, base: Path) -> None:
        self.root = base / "r"
        self.home = base / "h"
        self.root.mkdir()
        self.home.mkdir()
        self._open: list[socket.socket] = []

    def _path(self, where: str) -> Path:
        p = self.home / where[2:] if where.startswith("~/") else self.root / where.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def live(self, where: str) -> Path:
        """A socket an engine-like server answers `/_ping` on."""
        p = self.hung(where)
        threading.Thread(target=_answer_pings, args=(self._open[-1],), daemon=True).start()
        return p

    def hung(self, where: str) -> Path:
        """A socket that accepts connections and never answers (a wedged daemon)."""
        p = self._path(where)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        s.listen(8)
        self._open.append(s)
        return p

    def stale(self, where: str) -> Path:
        """A socket file left behind by an engine that is no longer running."""
        p = self._path(where)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        s.close()
        return p

    def plain_file(self, where: str) -> Path:
        p = self._path(where)
        p.write_text("not a socket")
        return p

    def docker_context(self, name: str, host: str, config_dir: Path | None = None) -> Path:
        d = (config_dir or self.home / ".docker") / "contexts" / "meta"
        meta = d / hashlib.sha256(name.encode()).hexdigest() / "meta.json"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(
            json.dumps(
                {
                    "Name": name,
                    "Metadata": {},
                    "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": False}},
                }
            )
        )
        return meta

    def current_context(self, name: str, config_dir: Path | None = None) -> None:
        cfg = (config_dir or self.home / ".docker") / "config.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps({"auths": {}, "currentContext": name}))

    def close(self) -> None:
        for s in self._open:
            s.close()


@pytest.fixture
def layout() -> Iterator[Layout]:
    # Not tmp_path: unix socket paths are limited to ~107 bytes and test names are long.
    base = Path(tempfile.mkdtemp(prefix="kw-disc-"))
    lay = Layout(base)
    try:
        yield lay
    finally:
        lay.close()
        shutil.rmtree(base, ignore_errors=True)


def no_machine() -> str:
    raise AssertionError("podman machine inspect must not run here")


def linux(lay: Layout, env: dict[str, str] | None = None, **kw: object) -> Callable[[], object]:
    def run() -> object:
        return find_engine(
            environ=env or {},
            home=lay.home,
            platform="linux",
            uid=1000,
            fs_root=lay.root,
            run_podman_machine=no_machine,
            **kw,  # type: ignore[arg-type]
        )

    return run


def mac(
    lay: Layout, machine: Callable[[], str], env: dict[str, str] | None = None
) -> Callable[[], object]:
    def run() -> object:
        return find_engine(
            environ=env or {},
            home=lay.home,
            platform="darwin",
            uid=501,
            fs_root=lay.root,
            run_podman_machine=machine,
        )

    return run


# --- parsing and probing ------------------------------------------------------------------------


def test_host_values() -> None:
    assert socket_path_from_host("unix:///run/podman/podman.sock") == Path(
        "/run/podman/podman.sock"
    )
    assert socket_path_from_host("/var/run/docker.sock") == Path("/var/run/docker.sock")
    for bad in ("tcp://10.0.0.1:2375", "ssh://me@box", "https://h:2376", "npipe:////./pipe/x"):
        with pytest.raises(ValueError, match="unix sockets only"):
            socket_path_from_host(bad)


def test_probe_reasons(layout: Layout) -> None:
    assert probe_socket(layout.live("/run/ok.sock")) is None
    assert "does not exist" in (probe_socket(layout.root / "nope.sock") or "")
    assert "not a unix socket" in (probe_socket(layout.plain_file("/run/f.sock")) or "")
    assert "refused" in (probe_socket(layout.stale("/run/old.sock")) or "")
    hung = probe_socket(layout.hung("/run/hung.sock"), ping_timeout=0.2)
    assert "did not answer /_ping within 0.2s" in (hung or "")
    deep = layout.root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    long_sock = deep / "docker.sock"
    # Bind through a short relative path: the kernel limit applies to the string we pass.
    cwd = os.getcwd()
    os.chdir(deep)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("docker.sock")
        s.listen(1)
    finally:
        os.chdir(cwd)
    try:
        assert "too long" in (probe_socket(long_sock) or "")
    finally:
        s.close()


# --- Linux candidates ---------------------------------------------------------------------------


def test_linux_rootless_podman_after_dead_and_fake_docker(layout: Layout) -> None:
    layout.stale("/var/run/docker.sock")
    layout.plain_file("/run/docker.sock")
    want = layout.live("/run/user/1000/podman/podman.sock")
    found = linux(layout)()
    assert found.socket_path == want
    assert found.how == "candidate: rootless podman"
    reasons = {a.location: a.reason for a in found.tried}
    assert "refused" in reasons[str(layout.root / "var/run/docker.sock")]
    assert "not a unix socket" in reasons[str(layout.root / "run/docker.sock")]
    assert "does not exist" in reasons[str(layout.root / "run/user/1000/docker.sock")]
    assert reasons[str(want)] is None


def test_linux_order_rootful_docker_first(layout: Layout) -> None:
    docker = layout.live("/var/run/docker.sock")
    layout.live("/run/user/1000/podman/podman.sock")
    layout.live("/run/podman/podman.sock")
    found = linux(layout)()
    assert (found.socket_path, found.how) == (docker, "candidate: docker")


def test_linux_xdg_runtime_dir_env(layout: Layout) -> None:
    xdg = layout.root / "xdg"
    want = layout.live("/xdg/docker.sock")
    layout.live("/run/user/1000/podman/podman.sock")  # default dir: not looked at
    found = linux(layout, {"XDG_RUNTIME_DIR": str(xdg)})()
    assert (found.socket_path, found.how) == (want, "candidate: rootless docker")


@pytest.mark.parametrize(
    ("where", "how"),
    [
        ("/run/podman/podman.sock", "candidate: rootful podman"),
        ("~/.docker/desktop/docker.sock", "candidate: Docker Desktop"),
        ("~/.colima/default/docker.sock", "candidate: Colima"),
        ("~/.rd/docker.sock", "candidate: Rancher Desktop"),
        ("~/.lima/default/sock/docker.sock", "candidate: Lima"),
    ],
)
def test_linux_other_candidates(layout: Layout, where: str, how: str) -> None:
    want = layout.live(where)
    found = linux(layout)()
    assert (found.socket_path, found.how) == (want, how)


def test_linux_nothing_lists_every_candidate_and_never_runs_podman_machine(
    layout: Layout,
) -> None:
    layout.stale("/run/podman/podman.sock")
    with pytest.raises(EngineNotFound) as err:
        linux(layout)()
    text = str(err.value)
    for piece in (
        "var/run/docker.sock",
        "run/user/1000/docker.sock",
        "run/user/1000/podman/podman.sock",
        "run/podman/podman.sock: connection refused",
        ".docker/desktop/docker.sock",
        ".colima/default/docker.sock",
        ".rd/docker.sock",
        ".lima/default/sock/docker.sock",
    ):
        assert piece in text, piece
    assert len(err.value.tried) == 9
    assert all(a.reason for a in err.value.tried)
    assert "podman machine" not in text


# --- explicit settings and environment precedence -----------------------------------------------


def test_explicit_wins_over_everything(layout: Layout) -> None:
    mine = layout.live("/tmp/mine.sock")
    other = layout.live("/run/other.sock")
    layout.live("/var/run/docker.sock")
    env = {"DOCKER_HOST": f"unix://{other}", "KEYWARD_ENGINE_SOCKET": str(other)}
    found = linux(layout, env, explicit=f"unix://{mine}")()
    assert (found.socket_path, found.how) == (mine, "--engine-socket")
    assert len(found.tried) == 1


@pytest.mark.parametrize("kind", ["stale", "missing", "plain_file"])
def test_dead_explicit_socket_is_an_error_without_fallback(layout: Layout, kind: str) -> None:
    layout.live("/var/run/docker.sock")  # a working engine that must NOT be used instead
    path = layout.root / "tmp/explicit.sock"
    if kind == "stale":
        layout.stale("/tmp/explicit.sock")
    elif kind == "plain_file":
        layout.plain_file("/tmp/explicit.sock")
    with pytest.raises(EngineNotFound) as err:
        linux(layout, explicit=str(path))()
    assert [a.source for a in err.value.tried] == ["--engine-socket"]
    assert "never replaced by another engine" in str(err.value)
    assert str(path) in str(err.value)


def test_keyward_engine_socket_env_is_explicit(layout: Layout) -> None:
    layout.live("/var/run/docker.sock")
    live = layout.live("/x/k.sock")
    found = linux(layout, {"KEYWARD_ENGINE_SOCKET": str(live)})()
    assert found.how == "KEYWARD_ENGINE_SOCKET"
    with pytest.raises(EngineNotFound):
        linux(layout, {"KEYWARD_ENGINE_SOCKET": str(layout.root / "gone.sock")})()


def test_docker_host_before_container_host(layout: Layout) -> None:
    a = layout.live("/a/docker.sock")
    b = layout.live("/b/podman.sock")
    layout.live("/var/run/docker.sock")
    env = {"DOCKER_HOST": f"unix://{a}", "CONTAINER_HOST": f"unix://{b}"}
    assert linux(layout, env)().how == "DOCKER_HOST"
    found = linux(layout, {"CONTAINER_HOST": f"unix://{b}"})()
    assert (found.socket_path, found.how) == (b, "CONTAINER_HOST")


def test_dead_docker_host_does_not_fall_back(layout: Layout) -> None:
    layout.live("/var/run/docker.sock")
    stale = layout.stale("/gone/docker.sock")
    with pytest.raises(EngineNotFound) as err:
        linux(layout, {"DOCKER_HOST": f"unix://{stale}"})()
    assert [a.source for a in err.value.tried] == ["DOCKER_HOST"]


@pytest.mark.parametrize("host", ["tcp://127.0.0.1:2375", "ssh://user@build-box"])
def test_tcp_and_ssh_hosts_are_refused_clearly(layout: Layout, host: str) -> None:
    layout.live("/var/run/docker.sock")
    with pytest.raises(EngineNotFound) as err:
        linux(layout, {"DOCKER_HOST": host})()
    text = str(err.value)
    assert "unix sockets only" in text
    assert host in text
    assert "var/run/docker.sock" not in text  # no silent fallback


# --- Docker CLI contexts ------------------------------------------------------------------------


def test_current_context_from_config_json(layout: Layout) -> None:
    sock = layout.live("~/.colima/work/docker.sock")
    layout.docker_context("colima-work", f"unix://{sock}")
    layout.current_context("colima-work")
    layout.live("/var/run/docker.sock")
    found = linux(layout)()
    assert (found.socket_path, found.how) == (sock, "docker context colima-work")


def test_docker_config_env_and_docker_context_env(layout: Layout) -> None:
    cfg = layout.root / "cfg"
    a = layout.live("/ctx/a.sock")
    b = layout.live("/ctx/b.sock")
    layout.docker_context("a", f"unix://{a}", cfg)
    layout.docker_context("b", f"unix://{b}", cfg)
    layout.current_context("a", cfg)
    env = {"DOCKER_CONFIG": str(cfg)}
    assert linux(layout, env)().socket_path == a
    found = linux(layout, {**env, "DOCKER_CONTEXT": "b"})()
    assert (found.socket_path, found.how) == (b, "docker context b")


def test_docker_host_beats_context(layout: Layout) -> None:
    a = layout.live("/ctx/a.sock")
    h = layout.live("/h/docker.sock")
    layout.docker_context("a", f"unix://{a}")
    found = linux(layout, {"DOCKER_HOST": f"unix://{h}", "DOCKER_CONTEXT": "a"})()
    assert found.how == "DOCKER_HOST"


def test_unknown_docker_context_env_is_an_error(layout: Layout) -> None:
    layout.live("/var/run/docker.sock")
    with pytest.raises(EngineNotFound) as err:
        linux(layout, {"DOCKER_CONTEXT": "nope"})()
    assert "no such docker context" in str(err.value)


def test_default_context_means_candidates(layout: Layout) -> None:
    want = layout.live("/run/docker.sock")
    layout.current_context("default")
    assert linux(layout)().socket_path == want
    assert linux(layout, {"DOCKER_CONTEXT": "default"})().socket_path == want


def test_dead_current_context_is_recorded_then_candidates(layout: Layout) -> None:
    stale = layout.stale("~/.docker/desktop/old.sock")
    layout.docker_context("desktop-linux", f"unix://{stale}")
    layout.current_context("desktop-linux")
    want = layout.live("/run/podman/podman.sock")
    found = linux(layout)()
    assert found.socket_path == want
    first = found.tried[0]
    assert first.source == "docker context desktop-linux"
    assert "refused" in (first.reason or "")


def test_tcp_context_is_refused_with_reason(layout: Layout) -> None:
    layout.docker_context("remote", "tcp://192.0.2.10:2376")
    layout.current_context("remote")
    with pytest.raises(EngineNotFound) as err:
        linux(layout)()
    assert "tcp:// is not supported" in str(err.value)


# --- macOS --------------------------------------------------------------------------------------


def test_macos_orbstack_after_dead_docker_desktop(layout: Layout) -> None:
    layout.stale("~/.docker/run/docker.sock")
    want = layout.live("~/.orbstack/run/docker.sock")
    found = mac(layout, no_machine)()
    assert (found.socket_path, found.how) == (want, "candidate: OrbStack")
    assert "refused" in (found.tried[0].reason or "")


def test_macos_lima_any_instance(layout: Layout) -> None:
    want = layout.live("~/.lima/myvm/sock/docker.sock")
    found = mac(layout, no_machine)()
    assert (found.socket_path, found.how) == (want, "candidate: Lima myvm")


def test_macos_podman_machine_inspect(layout: Layout) -> None:
    sock = layout.live("/var/folders/xy/T/podman/podman-machine-default-api.sock")
    calls: list[int] = []

    def machine() -> str:
        calls.append(1)
        return f"{sock}\n"

    found = mac(layout, machine)()
    assert (found.socket_path, found.how) == (sock, "candidate: podman machine")
    assert calls == [1]


def test_macos_podman_machine_failure_is_a_reason(layout: Layout) -> None:
    def machine() -> str:
        raise RuntimeError("podman is not installed")

    with pytest.raises(EngineNotFound) as err:
        mac(layout, machine)()
    text = str(err.value)
    assert "podman machine inspect" in text
    assert "podman is not installed" in text
    for piece in (".docker/run/docker.sock", ".orbstack/run/docker.sock", ".colima/docker.sock"):
        assert piece in text


def test_other_platform_says_so(layout: Layout) -> None:
    with pytest.raises(EngineNotFound) as err:
        find_engine(environ={}, home=layout.home, platform="win32", fs_root=layout.root)
    assert "no known socket locations" in str(err.value)


# --- the command --------------------------------------------------------------------------------


def keyward(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=60,
    )


def test_cli_dead_explicit_socket_lists_it_and_exits_1(layout: Layout) -> None:
    stale = layout.stale("/run/x.sock")
    r = keyward("engine", "--engine-socket", str(stale), env={"HOME": str(layout.home)})
    assert r.returncode == 1
    assert "--engine-socket" in r.stderr
    assert "connection refused" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_json_not_found(layout: Layout) -> None:
    r = keyward("engine", "--json", env={"HOME": str(layout.home), "DOCKER_HOST": "tcp://h:1"})
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["tried"] == [
        {
            "source": "DOCKER_HOST",
            "location": "tcp://h:1",
            "reason": data["tried"][0]["reason"],
        }
    ]
    assert "unix sockets only" in data["tried"][0]["reason"]


def test_cli_socket_that_never_answers_fails_after_the_ping_timeout(layout: Layout) -> None:
    """A socket that accepts and never answers is reported, not waited on for 120 s."""
    hung = layout.hung("/run/hung.sock")
    r = keyward("engine", "--engine-socket", str(hung), env={"HOME": str(layout.home)})
    assert r.returncode == 1
    assert "did not answer /_ping within 5s" in r.stderr


def test_hung_candidate_is_skipped_for_the_next_one(layout: Layout) -> None:
    layout.hung("/var/run/docker.sock")
    ok = layout.live("/run/podman/podman.sock")
    found = find_engine(environ={}, home=layout.home, platform="linux", uid=0, fs_root=layout.root)
    assert found.socket_path == ok
    assert "did not answer /_ping" in (found.tried[0].reason or "")


def test_cli_closed_pipe_exits_quietly(layout: Layout) -> None:
    """`keyward engine --json | head`: the reader is gone before we write; no error text."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "engine", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(ROOT),
                "HOME": str(layout.home),
                "DOCKER_HOST": "tcp://h:1",
            },
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == 141
