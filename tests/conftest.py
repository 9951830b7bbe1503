# --- keyward netfilter/pod: root and network-namespace tests (begin) ---
# Tests marked `root` need root, `ip netns` and nf_tables iptables. They skip with the reason
# elsewhere, but fail when CI=true: a CI job that silently skips them proves nothing.
import functools as _kw_functools
import os as _kw_os
import shutil as _kw_shutil
import subprocess as _kw_subprocess

import pytest as _kw_pytest


@_kw_functools.cache
def _kw_root_problem() -> str | None:
    """Why root/namespace tests cannot run here, or None; computed once per session."""
    from gateway.pod.netns import can_use_netns

    for tool in ("ip", "iptables", "ip6tables", "iptables-restore", "setpriv"):
        if _kw_shutil.which(tool) is None:
            return f"{tool} not installed"
    problem = can_use_netns()
    if problem:
        return problem
    version = _kw_subprocess.run(
        ["iptables", "-V"], capture_output=True, text=True, check=False
    ).stdout
    if "nf_tables" not in version:
        return f"iptables is not the nf_tables backend: {version.strip()}"
    return None


def require_root() -> None:
    """Skip (or, with CI=true, fail) unless namespaces and nft iptables are usable."""
    problem = _kw_root_problem()
    if problem is None:
        return
    if _kw_os.environ.get("CI", "").lower() == "true":
        _kw_pytest.fail(f"root test cannot run with CI=true: {problem}", pytrace=False)
    _kw_pytest.skip(problem)


@_kw_pytest.fixture(scope="session")
def root_ok() -> None:
    """For module/session fixtures that build namespaces: they run before function markers."""
    require_root()


@_kw_pytest.fixture(autouse=True)
def _kw_root_marker(request: _kw_pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is not None:
        require_root()


# --- keyward netfilter/pod: root and network-namespace tests (end) ---


# --- keyward engine: real Docker / Podman tests (begin) ---
# `require_engine(kind)` finds a real engine of that kind by asking each well-known socket's
# /_ping (Podman sets Libpod-Api-Version; the path says nothing). No engine: skip with the reason,
# or fail when CI=true. KEYWARD_TEST_DOCKER_SOCKET / KEYWARD_TEST_PODMAN_SOCKET pin a socket.
import socket as _kw_socket  # noqa: E402

_KW_ENGINE_CANDIDATES = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/podman/podman.sock",
    "{xdg}/podman/podman.sock",
    "{xdg}/docker.sock",
)


def _kw_ping_kind(path: str) -> tuple[str | None, str]:
    """('docker'|'podman'|None, why not) by a plain HTTP/1.0 GET /_ping over the socket."""
    s = _kw_socket.socket(_kw_socket.AF_UNIX, _kw_socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return None, f"{path}: {e.strerror or e}"
    finally:
        s.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    if " 200 " not in head.split("\r\n", 1)[0] + " ":
        return None, f"{path}: /_ping did not answer 200"
    return ("podman" if "\r\nlibpod-api-version:" in head else "docker"), ""


@_kw_functools.cache
def _kw_engine_socket(kind: str) -> tuple[str | None, str]:
    pinned = _kw_os.environ.get(f"KEYWARD_TEST_{kind.upper()}_SOCKET")
    xdg = _kw_os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{_kw_os.getuid()}"
    paths = [pinned] if pinned else [p.format(xdg=xdg) for p in _KW_ENGINE_CANDIDATES]
    reasons: list[str] = []
    for path in dict.fromkeys(_kw_os.path.realpath(p) for p in paths):
        if not _kw_os.path.exists(path):
            reasons.append(f"{path}: does not exist")
            continue
        found, why = _kw_ping_kind(path)
        if found == kind:
            return path, ""
        reasons.append(why or f"{path}: is {found}")
    return None, f"no {kind} engine socket found ({'; '.join(reasons)})"


def require_engine(kind: str) -> str:
    """The socket of a real `kind` engine ("docker" or "podman"); skip, or fail with CI=true."""
    path, why = _kw_engine_socket(kind)
    if path is not None:
        return path
    if _kw_os.environ.get("CI", "").lower() == "true":
        _kw_pytest.fail(f"engine test cannot run with CI=true: {why}", pytrace=False)
    _kw_pytest.skip(why)


# --- keyward engine: real Docker / Podman tests (end) ---
