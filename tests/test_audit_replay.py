"""`keyward audit replay`: a log recorded by a real gateway, re-decided under candidate policies."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.audit.replay import replay
from gateway.config.compile import build_policy
from gateway.config.loader import load_config
from tests.support.world import CONFIG, KEYWARD, REAL_KEY, World, make_world

# What the agent does under the recorded policy: an injected GET, a rule-denied DELETE, a
# default-denied host, an allowed host that gets nothing, and a wildcard hit.
AGENT = """
import urllib.request as u, urllib.error as e
def go(method, url):
    try:
        u.urlopen(u.Request(url, method=method), timeout=30).read()
    except e.HTTPError as err:  # a 403 from keyward
        err.read()
    except e.URLError:  # a refused CONNECT
        pass
go("GET", "https://api.example.test/v1/models?key=zzz")
go("GET", "https://api.example.test/v1/models")
go("DELETE", "https://api.example.test/admin/users/1")
go("GET", "https://evil.example.test/steal")
go("GET", "https://open.example.test/simple/")
go("GET", "https://a.wild.example.test/x")
"""


@pytest.fixture
async def recorded(tmp_path: Path) -> AsyncIterator[World]:
    world = await make_world(tmp_path)
    try:
        # asyncio's subprocess: the fake upstream answers from this same event loop
        proc = await asyncio.create_subprocess_exec(
            *world.run_argv("python3", "-c", AGENT),
            env=world.env(),
            cwd=world.dir,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        yield world
    finally:
        await world.upstream.close()


def candidate(world: World, name: str, edit: str | None = None, text: str | None = None) -> Path:
    """A candidate config next to the recorded one: the same file with one edit applied."""
    original = world.config.read_text()
    if text is None:
        assert edit is not None
        old, new = edit.split(" => ")
        assert old in original
        text = original.replace(old, new)
    path = world.dir / name
    path.write_text(text)
    return path


def run_replay(world: World, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYWARD, "audit", "replay", "-c", str(config), str(world.audit_path), *extra],
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_same_policy_changes_nothing(recorded: World) -> None:
    records = recorded.audit()
    assert len(records) == 6 and REAL_KEY not in recorded.audit_path.read_text()
    proc = run_replay(recorded, recorded.config, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["changed"] == 0 and report["replayed"] == 6
    assert report["unchanged"] == 6 and report["not_replayable"] == {}


def test_tightened_policy_reports_newly_denied_and_exits_1(recorded: World) -> None:
    tight = candidate(
        recorded,
        "tight.yaml",
        'deny: ["DELETE /admin/**"] => deny: ["DELETE /admin/**", "GET /v1/**"]',
    )
    proc = run_replay(recorded, tight, "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["newly_denied"] == 2 and report["newly_allowed"] == 0
    (group,) = report["groups"]
    assert group["host"] == "api.example.test" and group["rule_after"] == "api.example.test"
    assert group["examples"] == ["GET /v1/models", "GET /v1/models?key=REDACTED"]
    # and the human form says the same in one line per group
    text = run_replay(recorded, tight)
    assert text.returncode == 1
    assert "2 newly denied" in text.stdout and "api.example.test" in text.stdout


def test_loosened_policy_reports_newly_allowed_and_injection_changes(recorded: World) -> None:
    loose_text = (
        CONFIG.replace(
            "    open.example.test: {{}}",
            '    open.example.test:\n      headers: {{ X-Key: "{{key}}" }}\n'
            "    evil.example.test: {{}}",
        )
        .replace('deny: ["DELETE /admin/**"]', "deny: []")
        .format(ca=recorded.ca.path, port=recorded.upstream.port)
    )
    loose = candidate(recorded, "loose.yaml", text=loose_text)
    report = json.loads(run_replay(recorded, loose, "--json").stdout)
    assert report["newly_allowed"] == 2  # the DELETE and evil.example.test
    assert report["injections_changed"] == 1  # open.example.test now gets a key
    by_host = {g["host"]: g for g in report["groups"]}
    assert by_host["evil.example.test"]["rule_before"] is None
    assert by_host["evil.example.test"]["rule_after"] == "evil.example.test"
    assert by_host["open.example.test"]["injections_added"] == ["key@header:X-Key"]
    assert by_host["api.example.test"]["kinds"] == {"newly-allowed": 1}


def test_records_decided_on_facts_the_log_lacks_are_not_guessed(tmp_path: Path) -> None:
    """A Host mismatch or a wrong-host placeholder depends on what the log does not keep."""
    cfg = tmp_path / "k.yaml"
    cfg.write_text("version: 1\negress:\n  default: allow\n")
    policy = build_policy(load_config(cfg).config)
    base = {"plane": "mitm", "method": "GET", "scheme": "https", "host": "a.test", "port": 443}
    records = [
        {**base, "path": "/", "decision": "deny", "reason": "host-mismatch"},
        {**base, "path": "/", "decision": "deny", "reason": "placeholder-wrong-host: K"},
        {**base, "path": "/", "decision": "deny", "reason": "no-rule"},
        {**base, "method": "UDP", "decision": "deny", "reason": "udp-killed"},
    ]
    report = replay(policy, records)
    assert report.not_replayable == {"host-mismatch": 1, "placeholder-wrong-host": 1, "udp": 1}
    assert [c.kind for c in report.changes] == ["newly-allowed"]  # the default-deny one


def test_dns_and_connection_records_are_replayed(tmp_path: Path) -> None:
    cfg = tmp_path / "k.yaml"
    cfg.write_text(
        'version: 1\negress:\n  hosts:\n    pypi.test: {}\n    "raw.test:22": { tcp: true }\n'
    )
    policy = build_policy(load_config(cfg).config)
    dns = {"plane": "dns", "scheme": "dns", "port": 53, "path": ""}
    records = [
        {**dns, "method": "A", "host": "pypi.test", "decision": "deny", "reason": "no-rule"},
        {**dns, "method": "TXT", "host": "pypi.test", "decision": "deny", "reason": "txt-refused"},
        {"plane": "passthrough", "method": "TLS", "host": "pypi.test", "port": 443,
         "decision": "allow", "reason": "rule", "rule": "pypi.test"},
        {"plane": "mitm", "method": "TCP", "host": "raw.test", "port": 22, "decision": "deny",
         "reason": "non-http-killed"},
    ]  # fmt: skip
    report = replay(policy, records)
    kinds = [(c.host, c.method, c.kind) for c in report.changes]
    assert kinds == [("pypi.test", "A", "newly-allowed"), ("raw.test", "TCP", "newly-allowed")]
    assert report.unchanged == 2
