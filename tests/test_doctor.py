"""`keyward doctor` on a newcomer's set-up: what is wrong, and the fix, for each piece."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.world import ROOT


def doctor(cwd: Path, home: Path) -> tuple[int, dict[str, dict[str, object]]]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "KEYWARD_STATE": str(cwd / "state"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    report = json.loads(r.stdout)
    return r.returncode, {str(c["name"]): c for c in report["checks"]}


@pytest.mark.slow
def test_doctor_after_init_then_fixed_then_a_client_that_overrides_trust(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(
        [sys.executable, "-m", "gateway", "init"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    code, checks = doctor(tmp_path, home)
    assert code == 1
    assert checks["config"]["ok"] is True
    assert checks["secrets"]["ok"] is False
    assert "OPENAI_API_KEY" in str(checks["secrets"]["detail"])
    assert str(tmp_path / ".env") in str(checks["secrets"]["fix"])
    assert checks["CA"]["ok"] is True  # created, as the first `keyward run` would
    trust = {n: c for n, c in checks.items() if n.startswith("trust: ")}
    for client in ("curl", "node", "git", "npm"):
        if shutil.which(client):
            assert trust[f"trust: {client}"]["ok"] is True, trust[f"trust: {client}"]
    assert trust["trust: python"]["ok"] is True

    env_file = tmp_path / ".env"
    env_file.write_text("OPENAI_API_KEY=sk-x-0123456789\nANTHROPIC_API_KEY=sk-ant-x-0123456\n")
    env_file.chmod(0o600)
    (home / ".curlrc").write_text(f"cacert = {tmp_path / 'nothing-trusted.pem'}\n")
    (tmp_path / "nothing-trusted.pem").write_text("")
    code, checks = doctor(tmp_path, home)
    assert checks["secrets"]["ok"] is True
    if shutil.which("curl"):
        assert code == 1
        assert checks["trust: curl"]["ok"] is False
        assert ".curlrc" in str(checks["trust: curl"]["fix"])
    assert "sk-x-0123456789" not in json.dumps(checks)
