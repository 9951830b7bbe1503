"""The CLI as a user runs it: exit codes, one-line errors, no secret in any output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "keyward.yaml"


def keyward(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd or ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=60,
    )


def test_check_example_names_secrets_only() -> None:
    env = {
        "OPENAI_API_KEY": "sk-REAL-openai-000000",
        "ANTHROPIC_API_KEY": "sk-ant-REAL-1111111",
        "GITHUB_TOKEN": "ghp_REAL22222222222222",
    }
    r = keyward("check", "-c", str(EXAMPLE), "--json", env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    github = next(h for h in info["hosts"] if h["host"] == "github.com")
    assert github["injects"] == [{"secret": "github", "location": "basic"}]
    assert "REAL" not in r.stdout + r.stderr


def test_check_missing_secret_is_a_startup_error() -> None:
    r = keyward("check", "-c", str(EXAMPLE), env={"OPENAI_API_KEY": "sk-REAL-openai-000000"})
    assert r.returncode == 2
    assert "secret 'anthropic'" in r.stderr and "ANTHROPIC_API_KEY" in r.stderr
    assert "secret 'github'" in r.stderr  # every missing secret, not just the first
    assert "REAL" not in r.stderr and "Traceback" not in r.stderr


def test_check_bad_config_exit_2_with_file_line(tmp_path: Path) -> None:
    cfg = tmp_path / "keyward.yaml"
    cfg.write_text(
        "version: 1\negress:\n  hosts:\n    api.github.com:\n      deny: ['DELETE /x', 'nope']\n"
    )
    r = keyward("check", "-c", str(cfg), "--skip-secrets")
    assert r.returncode == 2
    assert f'{cfg}:5: egress.hosts."api.github.com".deny[1]:' in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    r = keyward("check", "-c", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_policy_test_json() -> None:
    r = keyward(
        "policy",
        "test",
        "--json",
        "DELETE",
        "https://api.github.com/repos/../repos/o/r",
        "-c",
        str(EXAMPLE),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "decision": "deny",
        "rule": "api.github.com",
        "reason": "path-denied: DELETE /repos/**",
        "injected": [],
    }
    r = keyward(
        "policy",
        "test",
        "--json",
        "GET",
        "https://api.openai.com/v1/models",
        "-H",
        "Host: attacker.example",
        "-c",
        str(EXAMPLE),
    )
    assert json.loads(r.stdout)["reason"] == "host-mismatch"
    r = keyward("policy", "test", "GET", "ftp://x", "-c", str(EXAMPLE))
    assert r.returncode == 2 and "not an http(s)" in r.stderr


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    r = keyward("init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "keyward.yaml").read_text()
    assert "version: 1" in text
    (tmp_path / "keyward.yaml").write_text("mine")
    r = keyward("init", cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (tmp_path / "keyward.yaml").read_text() == "mine"
    assert keyward("init", "--force", cwd=tmp_path).returncode == 0
    assert (tmp_path / "keyward.yaml").read_text() == text


def test_schema_validates_example() -> None:
    r = keyward("schema")
    assert r.returncode == 0
    jsonschema.validate(yaml.safe_load(EXAMPLE.read_text()), json.loads(r.stdout))


def test_usage_errors_exit_2() -> None:
    assert keyward().returncode == 2
    assert keyward("nonsense").returncode == 2
    assert keyward("run", "-c", str(EXAMPLE)).returncode == 2


def test_log_table_and_summary(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    rows = [
        {
            "ts": "2026-01-01T00:00:00.000Z",
            "plane": "mitm",
            "decision": "allow",
            "method": "GET",
            "host": "api.openai.com",
            "path": "/v1",
            "status": 200,
            "reason": "rule",
            "injected": [{"secret": "openai", "location": "header:Authorization"}],
            "bytes_up": 10,
            "bytes_down": 20,
        },
        {
            "ts": "2026-01-01T00:00:01.000Z",
            "plane": "mitm",
            "decision": "deny",
            "method": "GET",
            "host": "evil.example",
            "path": "/",
            "status": 403,
            "reason": "no-rule",
            "injected": [],
            "alert": True,
        },
    ]
    audit.write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    r = keyward("log", str(audit))
    assert r.returncode == 0, r.stderr
    assert "api.openai.com" in r.stdout and "openai@header:Authorization" in r.stdout
    assert "no-rule" in r.stdout
    r = keyward("log", "--summary", "--json", str(audit))
    summary = {row["host"]: row for row in json.loads(r.stdout)}
    assert summary["api.openai.com"]["allow"] == 1 and summary["api.openai.com"]["injected"] == 1
    assert summary["evil.example"]["deny"] == 1 and summary["evil.example"]["alerts"] == 1
    assert keyward("log", str(tmp_path / "none.jsonl")).returncode == 2
