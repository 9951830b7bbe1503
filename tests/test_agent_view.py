"""Who the isolated agent runs as and what it may read: the decisions, without namespaces."""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path

import pytest

from gateway.pod import isolate
from gateway.pod.isolate import choose_agent, dedicated_agent_ids
from gateway.pod.masking import MountPlan, Workspace
from gateway.pod.privileges import readable_by

OTHER = 10124


def test_readable_by_follows_mode_bits_and_the_way_there() -> None:
    me = os.getuid()
    base = Path(tempfile.mkdtemp(prefix="keyward-readable-"))  # pytest's dirs are 0700
    try:
        base.chmod(0o755)
        d = base / "d"
        d.mkdir(mode=0o755)
        f = d / "secret"
        f.write_text("x")
        f.chmod(0o644)
        assert readable_by(f, OTHER) is True and readable_by(f, me) is True
        f.chmod(0o640)
        group = f.stat().st_gid
        assert readable_by(f, OTHER, {group}) is True
        assert readable_by(f, OTHER, {group + 1}) is False
        f.chmod(0o600)
        assert readable_by(f, OTHER) is False
        f.chmod(0o644)
        d.chmod(0o700)
        assert readable_by(f, OTHER) is False
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_invoking_user_owning_a_secret_gets_a_dedicated_uid(tmp_path: Path) -> None:
    me = os.getuid()
    config = tmp_path / "keyward.yaml"
    config.write_text("version: 1\n")
    project = tmp_path / "project"
    project.mkdir()
    agent = choose_agent([config], me, me, project)
    assert (agent.uid, agent.gid) == dedicated_agent_ids() and agent.uid != me
    assert agent.workspace is not None and agent.workspace.path == str(project.resolve())
    assert (agent.workspace.owner_uid, agent.workspace.owner_gid) == (me, project.stat().st_gid)


def test_the_invoking_user_owning_nothing_runs_as_themselves(tmp_path: Path) -> None:
    config = tmp_path / "keyward.yaml"
    config.write_text("version: 1\n")
    agent = choose_agent([config], OTHER, OTHER, tmp_path)
    assert (agent.uid, agent.gid, agent.workspace) == (OTHER, OTHER, None)


def test_without_sudo_the_dedicated_uid_maps_nothing(tmp_path: Path) -> None:
    agent = choose_agent([], None, None, tmp_path)
    assert agent.uid == dedicated_agent_ids()[0] and agent.workspace is None


def test_mount_plan_round_trips_through_the_helper_argv(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path), 1000, 1000, "/home/user")
    plan = MountPlan(("/a", "/b/c"), "/e", "/e.d", 10102, 10102, ws, cwd=str(tmp_path))
    argv = plan.argv()
    assert argv[1:4] == ["-I", "-m", "gateway.pod.masking"]
    assert MountPlan.from_json(argv[4]) == plan


def test_a_world_readable_home_above_the_workspace_is_still_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0755 home holds 0644 token files (~/.npmrc): the agent sees only the way down."""
    me = os.getuid()
    home = tmp_path / "home"
    project = home / "src" / "project"
    project.mkdir(parents=True)
    home.chmod(0o755)
    (home / ".npmrc").write_text("//registry/:_authToken=x\n")
    config = project / "keyward.yaml"
    config.write_text("version: 1\n")
    user = types.SimpleNamespace(pw_dir=str(home))
    monkeypatch.setattr(isolate.pwd, "getpwuid", lambda uid: user)
    agent = choose_agent([config], me, me, project)
    assert agent.workspace is not None and agent.workspace.reveal == str(home.resolve())
    assert choose_agent([config], me, me, home).workspace is None  # the home itself: not mapped
