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
# `require_engine(kind)` finds a real engine of that kind the way keyward does
# (gateway.engine.discovery: its well-known sockets, each asked /_ping, whose headers tell Podman
# from Docker). No engine: skip with the reason, or fail when CI=true.
# KEYWARD_TEST_DOCKER_SOCKET / KEYWARD_TEST_PODMAN_SOCKET pin a socket.


@_kw_functools.cache
def _kw_engine_socket(kind: str) -> tuple[str | None, str]:
    from pathlib import Path

    from gateway.engine.discovery import candidate_sockets, probe_kind

    pinned = _kw_os.environ.get(f"KEYWARD_TEST_{kind.upper()}_SOCKET")
    paths = [Path(pinned)] if pinned else [p for _, p in candidate_sockets()]
    reasons: list[str] = []
    for path in dict.fromkeys(Path(_kw_os.path.realpath(p)) for p in paths):
        found, why = probe_kind(path)
        if found == kind:
            return str(path), ""
        reasons.append(f"{path}: {why or f'is {found}'}")
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
