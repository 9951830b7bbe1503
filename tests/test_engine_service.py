"""Transport fallback on the real Podman binary: no API socket answers, so keyward starts
`podman system service` on a private socket for the command, and stops it afterwards."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

import pytest

from gateway.cli.engine_cmds import describe
from gateway.engine.discovery import find_engine
from gateway.engine.errors import EngineNotFound

pytestmark = pytest.mark.engine


def _need_podman() -> str:
    exe = shutil.which("podman")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("podman is not installed", pytrace=False)
        pytest.skip("podman is not installed")
    return exe


def _empty_machine(tmp_path: Path) -> dict[str, object]:
    """A machine with no engine socket anywhere (fake root and home)."""
    (tmp_path / "root").mkdir()
    (tmp_path / "home").mkdir()
    return {
        "environ": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "home": tmp_path / "home",
        "platform": "linux",
        "uid": 0,
        "fs_root": tmp_path / "root",
    }


def test_no_socket_answers_so_a_private_podman_service_is_started(tmp_path: Path) -> None:
    _need_podman()
    machine = _empty_machine(tmp_path)
    with pytest.raises(EngineNotFound):
        find_engine(**machine)  # type: ignore[arg-type]
    found = find_engine(fallback=True, **machine)  # type: ignore[arg-type]
    try:
        assert found.service is not None
        assert found.how.startswith("started: podman system service")
        directory = found.socket_path.parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        facts = asyncio.run(describe(found))
        assert facts["kind"] == "podman" and facts["found_by"] == found.how
    finally:
        found.close()
    assert found.service.process.poll() is not None, "the service outlived the command"
    assert not directory.exists()


def test_explicit_setting_never_falls_back(tmp_path: Path) -> None:
    _need_podman()
    machine = _empty_machine(tmp_path)
    machine["environ"] = {**machine["environ"], "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}  # type: ignore[dict-item]
    with pytest.raises(EngineNotFound) as e:
        find_engine(fallback=True, **machine)  # type: ignore[arg-type]
    assert e.value.authoritative


def test_missing_podman_means_not_found(tmp_path: Path) -> None:
    machine = _empty_machine(tmp_path)
    machine["environ"] = {"PATH": str(tmp_path)}
    with pytest.raises(EngineNotFound):
        find_engine(fallback=True, **machine)  # type: ignore[arg-type]
