"""The README's first commands, verbatim, on a fresh copy of the repository (no .venv): the
demo installs keyward and shows what it promises, the next lines use the keyward it left, and
the quick start goes from `keyward init` to `keyward run -- claude`. The commands are read
from the README, so this test breaks when the README changes.

`claude` here is a stand-in on PATH (no real agent, no real API): it prints what the agent is
given and asks for a host no rule allows, which needs no DNS and reaches nothing."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("## Try it (offline, one command)", "## Quick start with your own agent")

AGENT = """#!/bin/sh
echo "agent key: $ANTHROPIC_API_KEY"
echo "agent proxy: $HTTPS_PROXY"
curl -sS https://not-allowed.example.test/v1/messages
"""


def readme_commands(text: str) -> list[str]:
    """Every line of the ```sh blocks in the README's first-ten-minutes sections, in order."""
    lines: list[str] = []
    for heading in SECTIONS:
        start = text.index(heading)
        nxt = re.search(r"^#{2,3} ", text[start + len(heading) :], re.M)
        section = text[start : start + len(heading) + nxt.start() if nxt else len(text)]
        for block in re.findall(r"```sh\n(.*?)```", section, re.S):
            lines.extend(x for x in block.splitlines() if x.strip())
    return lines


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files as they are now: what a `git clone` gives, no .venv."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
            target.chmod(src.stat().st_mode & 0o777)
    return dest


def test_readme_commands_readable_as_written() -> None:
    cmds = readme_commands((ROOT / "README.md").read_text())
    assert cmds[0] == "scripts/demo"
    assert any(c.startswith("keyward init") for c in cmds)
    assert any(c.startswith("keyward run -- ") for c in cmds)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_first_commands_work_on_a_fresh_clone(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path / "keyward")
    assert not (repo / ".venv").exists()
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "claude").write_text(AGENT)
    (shims / "claude").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    commands = readme_commands((repo / "README.md").read_text())
    script = "set -euo pipefail\n" + "".join(
        f"echo '+++ {i}'\n{line}\n" for i, line in enumerate(commands)
    )
    env = {
        "PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    started = time.monotonic()
    r = subprocess.run(
        ["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1700
    )
    took = time.monotonic() - started
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    steps = re.split(r"^\+\+\+ \d+$", r.stdout, flags=re.M)[1:]
    demo, *rest = steps
    # the demo: injected upstream, scrubbed on the way back, refusals an agent can read
    assert "[REDACTED]" in demo and "THIS-IS-THE-REAL-KEY" not in demo
    assert "keyward refused this request" in demo and "blocked.demo.test: {}" in demo
    assert f'export PATH="{repo}/.venv/bin:$PATH"' in demo
    assert any(s.strip().startswith("keyward ") for s in rest[:2])  # keyward --version
    last = steps[next(i for i, c in enumerate(commands) if c.startswith("keyward run -- "))]
    assert "agent key: sk-ant-" in last and "sk-ant-your-key" not in last
    assert "agent proxy: http://127.0.0.1:" in last
    assert "keyward refused this request" in last and "not-allowed.example.test: {}" in last
    print(f"README commands on a fresh copy: {took:.1f} s")
