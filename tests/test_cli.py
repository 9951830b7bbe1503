"""The CLI as a user runs it: exit codes, one-line errors, no secret in any output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
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
        "status": 403,
        "injected": [],
        "path": "/repos/../repos/o/r",
        "canonical_path": "/repos/o/r",
        "ambiguities": [],
        "methods": ["DELETE"],
        "upstream_target": None,
    }
    r = keyward(
        "policy", "test", "--json", "POST", "https://api.github.com/x/..%2Frepos/o/r?a=1",
        "-H", "X-HTTP-Method-Override: delete", "-c", str(EXAMPLE),
    )  # fmt: skip
    out = json.loads(r.stdout)
    assert out["reason"] == "ambiguous-path: encoded-slash" and out["status"] == 400
    assert out["ambiguities"] == ["encoded-slash"] and out["methods"] == ["POST", "DELETE"]
    r = keyward(
        "policy", "test", "--json", "POST", "https://api.github.com/repos/o/r",
        "-d", "a=1&_method=DELETE", "-c", str(EXAMPLE),
    )  # fmt: skip
    assert json.loads(r.stdout)["reason"] == "path-denied: DELETE /repos/**"
    r = keyward(
        "policy", "test", "HEAD", "https://api.github.com/user/./x//y?q=1", "-c", str(EXAMPLE)
    )
    assert "upstream:  /user/x/y?q=1" in r.stdout and "methods:   HEAD, GET" in r.stdout
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
    for url in ("https://0x7f.1/", "https://[fe80::1%25eth0]/"):  # not a host: refused
        r = keyward("policy", "test", "--json", "GET", url, "-c", str(EXAMPLE))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["reason"] == "bad-host"


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


@pytest.mark.parametrize("port", ["0", "65536", "x"])
def test_a_listener_port_that_is_not_a_port_is_a_usage_error(port: str) -> None:
    for command in (["serve"], ["netfilter", "render"]):
        r = keyward(*command, "--explicit-port", port)
        assert r.returncode == 2, (command, r.stderr)
        assert "--explicit-port" in r.stderr and "internal error" not in r.stderr, r.stderr


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
    r = keyward("log", "--json", str(audit))
    assert [x["host"] for x in json.loads(r.stdout)] == ["api.openai.com", "evil.example"]


def test_command_table_matches_what_the_modules_register() -> None:
    """`keyward --help` lists commands from a static table (so it imports no command module);
    the table must say exactly what the modules register."""
    import argparse

    from gateway.cli.main import COMMANDS, build_parser

    parser = build_parser("*")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert helps == {name: text for name, (_, text) in COMMANDS.items()}
    for name, (module, _) in COMMANDS.items():
        assert name in build_parser(name)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        assert module


def test_version_and_help_import_no_command() -> None:
    """Fast start: --version and --help load no command module and no heavy dependency."""
    heavy = ("gateway.cli.config_cmds", "mitmproxy", "aiohttp", "pydantic", "rich", "yaml")
    for args in (["--version"], ["--help"]):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "gateway", *args],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()}
        assert not [m for m in imported if m.split(".")[0] in heavy or m in heavy], args
    assert keyward("--version").stdout.startswith("keyward ")
    assert "run CMD with its traffic" in keyward("--help").stdout


def test_version_entry_point_loads_no_heavy_module() -> None:
    """`keyward --version` through the installed entry point (what a user times) leaves no
    heavy dependency in sys.modules: each of them costs a noticeable part of a second."""
    heavy = ("mitmproxy", "aiohttp", "pydantic", "yaml", "rich", "cryptography", "gateway.planes")
    probe = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: sys.stderr.write(json.dumps(sorted(sys.modules))))\n"
        "sys.argv = ['keyward', '--version']\n"
        "from gateway.cli.main import main\n"
        "sys.exit(main())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("keyward ")
    loaded = json.loads(r.stderr)
    assert "gateway.cli.main" in loaded
    assert not [m for m in loaded if m in heavy or m.startswith(tuple(h + "." for h in heavy))]


def test_debug_is_accepted_anywhere_but_inside_cmd(tmp_path: Path) -> None:
    from gateway.cli.main import split_debug

    missing = str(tmp_path / "none.yaml")
    for argv in (["--debug", "check", "-c", missing], ["check", "-c", missing, "--debug"]):
        r = keyward(*argv)
        assert r.returncode == 2 and "Traceback" in r.stderr, argv
    assert "Traceback" not in keyward("check", "-c", missing).stderr
    assert split_debug(["run", "--debug", "--", "sh", "--debug"]) == (
        ["run", "--", "sh", "--debug"],
        True,
    )
    assert split_debug(["run", "sh", "--debug"]) == (["run", "sh", "--debug"], False)


def test_policy_test_exit_code_for_ci() -> None:
    env = {
        "OPENAI_API_KEY": "sk-REAL-openai-000000",
        "ANTHROPIC_API_KEY": "sk-ant-REAL-1111111",
        "GITHUB_TOKEN": "ghp_REAL22222222222222",
    }
    allowed = ["policy", "test", "GET", "https://api.openai.com/v1/models", "-c", str(EXAMPLE)]
    denied = ["policy", "test", "GET", "https://nowhere.example.test/", "-c", str(EXAMPLE)]
    assert keyward(*allowed, "--exit-code", env=env).returncode == 0
    assert keyward(*denied, env=env).returncode == 0
    assert keyward(*denied, "--exit-code", env=env).returncode == 1


def test_url_written_as_a_host_says_write_the_bare_host(tmp_path: Path) -> None:
    cfg = tmp_path / "keyward.yaml"
    cfg.write_text('version: 1\negress:\n  hosts:\n    "https://api.example.test/v1": {}\n')
    r = keyward("check", "-c", str(cfg))
    assert r.returncode == 2
    assert "write the bare host name ('api.example.test')" in r.stderr
    assert "keyward.yaml:4" in r.stderr


@pytest.mark.root
def test_netfilter_verify_json_reports_drift() -> None:
    name = f"kw-nfjson-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        r = keyward("netfilter", "verify", "--netns", name, "--proxy-uid", "0", "--json",
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
        assert r.returncode == 1, r.stderr
        report = json.loads(r.stdout)
        assert report["in_force"] is False and report["drift"] and report["netns"] == name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_check_right_after_init_says_where_and_what_to_do(tmp_path: Path) -> None:
    """The first thing a newcomer runs: every unset secret at its file:line, and the ways out
    (export, a .env next to the config, --skip-secrets)."""
    assert keyward("init", cwd=tmp_path).returncode == 0
    r = keyward("check", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    starter = (tmp_path / "keyward.yaml").read_text().splitlines()
    at = {k: starter.index(next(x for x in starter if x.startswith(f"  {k}:"))) + 1 for k in ("openai", "anthropic")}  # fmt: skip
    assert (
        lines[0]
        == f"keyward: keyward.yaml:{at['openai']}: secret 'openai': env OPENAI_API_KEY is not set"
    )
    assert (
        lines[1]
        == f"keyward.yaml:{at['anthropic']}: secret 'anthropic': env ANTHROPIC_API_KEY is not set"
    )
    assert f"{tmp_path / '.env'}" in lines[2] and "--skip-secrets" in lines[2]
    assert keyward("check", "--skip-secrets", cwd=tmp_path).returncode == 0
    (tmp_path / ".env").write_text(
        "OPENAI_API_KEY=sk-x-0123456789\nANTHROPIC_API_KEY=sk-ant-x-01234\n"
    )
    r = keyward("check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sk-x-0123456789" not in r.stdout + r.stderr


def test_commands_print_plain_tables_without_rich(tmp_path: Path) -> None:
    """rich is optional (the sidecar image has none): tables fall back to aligned plain text."""
    site = tmp_path / "site"  # first on the path: a `rich` that fails to import, as if absent
    (site / "rich").mkdir(parents=True)
    (site / "rich" / "__init__.py").write_text("raise ImportError('no rich here')\n")
    r = keyward("check", "-c", str(EXAMPLE), "--skip-secrets", env={"PYTHONPATH": f"{site}:{ROOT}"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{EXAMPLE}: default deny"
    assert lines[1].split()[:2] == ["host", "decision"]
    assert ["github.com", "allow", "github", "->", "basic", "-"] in [x.split() for x in lines]
    assert lines[-1] == "config OK (secrets not resolved)"


def test_plain_text_drops_style_markup_only() -> None:
    from gateway.cli.console import plain

    assert plain("[green]pass[/] [red]FAIL[/] [bold]x[/bold]") == "pass FAIL x"
    assert plain("[::1]:443 [2001:db8::1] [a]") == "[::1]:443 [2001:db8::1] [a]"


def test_check_of_a_large_config_lists_every_host_without_rich_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """rich lays a table out at ~1 ms a row: a 200,000-host `check` spent minutes there. A table
    past RICH_MAX_ROWS is printed as plain aligned text, every host on its own line."""
    import rich.table

    from gateway.cli.console import RICH_MAX_ROWS
    from gateway.cli.main import main

    n = RICH_MAX_ROWS + 1
    hosts = "".join(f"    h{i}.example.test: {{}}\n" for i in range(n))
    config = tmp_path / "keyward.yaml"
    config.write_text(f"version: 1\negress:\n  default: deny\n  hosts:\n{hosts}")

    def no_rich_layout(*_: object, **__: object) -> None:
        raise AssertionError("a large table went through rich's layout")

    monkeypatch.setattr(rich.table.Table, "__init__", no_rich_layout)
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if ".example.test " in line]
    assert len(rows) == n and rows[-1] == [f"h{n - 1}.example.test", "allow", "-", "-"]
