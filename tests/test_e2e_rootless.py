"""A pair on rootless Podman, brought up by an unprivileged user as users meet it: their own
`podman system service` socket, no root anywhere in the pair's path.

The machine preparation (the user, its subordinate id ranges, /dev/net/tun, a tmpfs runtime dir,
the user's API service) is `scripts/ci-setup-engines`; the images reach the user's store without
the network through `scripts/rootless-images`. The test itself runs as root (it needs
`runuser`) and runs every `keyward` command as that user.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import secrets
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import pair
from tests.test_e2e_engines import (
    CONFIG,
    REAL_KEY,
    TEST_LABELS,
    UP_DIR,
    _cleanup,
    _engine_problem,
    _leftovers,
    _start_upstream,
    skip_or_fail_in_ci,
)
from tests.test_e2e_pairs import World

pytestmark = pytest.mark.engine
ROOTLESS_USER = os.environ.get("KEYWARD_ROOTLESS_USER", "keyward-ci")
REPO = Path(__file__).resolve().parent.parent


def _user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        return None


# Where the user imports keyward and its dependencies from: this checkout and its venv, or
# (when the user cannot read them, e.g. a checkout under root's 0700 home) a readable copy.
CODE_PATHS = [str(REPO), *site.getsitepackages()]


def _readable_copy() -> list[str]:
    """Copy the `gateway` package and the venv's site-packages where any user can read them."""
    where = Path(tempfile.mkdtemp(prefix="keyward-rootless-code-"))
    atexit.register(shutil.rmtree, where, True)
    shutil.copytree(REPO / "gateway", where / "src" / "gateway")
    paths = [str(where / "src")]
    for i, sp in enumerate(site.getsitepackages()):
        shutil.copytree(sp, where / f"site{i}", symlinks=True)
        paths.append(str(where / f"site{i}"))
    subprocess.run(["chmod", "-R", "a+rX", str(where)], check=True)
    where.chmod(0o755)
    return paths


def _user_env(pw: pwd.struct_passwd) -> dict[str, str]:
    """The environment of a login of that user, plus where keyward's code is."""
    return {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}",
        "PYTHONPATH": os.pathsep.join(CODE_PATHS),
        "LANG": "C.UTF-8",
    }


def _as_user(pw: pwd.struct_passwd, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", pw.pw_name, "--", "env", "-i",
         *(f"{k}={v}" for k, v in {**_user_env(pw), **kw.pop("env", {})}.items()), *argv],
        capture_output=True, text=True, check=False, cwd="/", **kw,
    )  # fmt: skip


def _python_for(pw: pwd.struct_passwd) -> str | None:
    """An interpreter of this Python's version the user can run (a venv's interpreter often
    lives under root's 0700 home), importing keyward from this checkout."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    exes = (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}")
    for attempt in range(2):
        for exe in exes:
            probe = _as_user(pw, [exe, "-c", "import gateway, aiohttp"], timeout=60)
            if probe.returncode == 0:
                return exe
        if attempt == 0:
            CODE_PATHS[:] = _readable_copy()
    return None


def _rootless_problem() -> str | None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return "needs root and runuser (runs keyward as the rootless user)"
    pw = _user()
    if pw is None:
        return f"no user {ROOTLESS_USER} (scripts/ci-setup-engines creates it)"
    sock = f"/run/user/{pw.pw_uid}/podman/podman.sock"
    if not Path(sock).exists():
        return f"no rootless Podman API socket at {sock} (scripts/ci-setup-engines starts it)"
    if _python_for(pw) is None:
        return f"{ROOTLESS_USER} cannot run a Python {sys.version_info[:2]} that imports keyward"
    problem = _engine_problem("podman", sock)
    if problem is not None:
        return f"{problem} (scripts/rootless-images copies the images)"
    w = World("podman", sock, "", "", "", Path("/"), [])
    if not w.run(lambda c: c.is_rootless()):
        return f"{sock} is not a rootless Podman"
    return None


def require_rootless() -> None:
    """Skip (or, with CI=true, fail) unless the rootless user's Podman answers with the images."""
    skip_or_fail_in_ci(_rootless_problem())


class RootlessWorld(World):
    """test_e2e_pairs' world on the user's socket: the CLI runs as the user, not as root."""

    pw: pwd.struct_passwd
    python: str

    def cli(
        self, *argv: str, timeout: float = 300, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return _as_user(
            self.pw,
            [self.python, "-m", "gateway", argv[0], "--engine-socket", self.socket, *argv[1:]],
            env={"E2E_API_KEY": REAL_KEY, **(env or {})},
            timeout=timeout,
            **kw,
        )

    def seen(self, upstream: str) -> list[dict[str, Any]]:
        r = self.run(lambda c: c.exec_run(upstream, ["cat", f"{UP_DIR}/run/seen.jsonl"]))
        return [json.loads(x) for x in r.stdout.decode().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def rootless() -> Iterator[tuple[RootlessWorld, str]]:
    require_rootless()
    pw = _user()
    assert pw is not None
    sock = f"/run/user/{pw.pw_uid}/podman/podman.sock"
    prefix = f"pr-{secrets.token_hex(3)}"
    # the user reads the config and writes the workspace: not under root's 0700 pytest dir
    base = Path(tempfile.mkdtemp(prefix="keyward-rootless-"))
    os.chown(base, pw.pw_uid, pw.pw_gid)
    w = RootlessWorld("podman", sock, prefix, f"keyward-{prefix}-net", "", base, [prefix])
    w.pw, w.python = pw, _python_for(pw) or sys.executable
    labels = {**TEST_LABELS, pair.LABEL_PAIR: prefix}
    try:
        # the network lives in the user's rootless network namespace: no host FORWARD rules
        w.run(lambda c: c.network_create(w.network, internal=True, labels=labels))
        upstream, ip, ca = w.run(lambda c: _start_upstream(c, prefix, w.network))
        w.upstream_ip = ip
        (base / "upstream-ca.pem").write_bytes(ca)
        (base / "keyward.yaml").write_text(CONFIG.format(ip=ip))
        yield w, upstream
    finally:
        for name in reversed(w.names):
            with contextlib.suppress(Exception):
                w.run(lambda c, n=name: _cleanup(c, n))  # type: ignore[misc]
        shutil.rmtree(base, ignore_errors=True)


def test_rootless_pair_injects_refuses_owns_the_workspace_and_goes_down(
    rootless: tuple[RootlessWorld, str],
) -> None:
    """One pair, brought up by the unprivileged user on its own rootless Podman."""
    w, upstream = rootless
    pw = w.pw
    ws = w.base / "ws"
    ws.mkdir()
    os.chown(ws, pw.pw_uid, pw.pw_gid)
    name = w.new_name("pair")
    r = w.cli_up(name, "--workspace", str(ws))
    assert r.returncode == 0, r.stderr
    # rootless on cgroup v1 has no controllers: `up` says the limits are not applied
    info = w.run(lambda c: c.engine_info())
    if str(info.get("host", {}).get("cgroupVersion")) == "v1":
        for controller in ("memory", "pids"):
            assert f"cannot apply the {controller} limit (rootless on cgroup v1)" in r.stderr, (
                r.stderr
            )

    def ex(*argv: str) -> subprocess.CompletedProcess[str]:
        return w.cli("exec", "--name", name, "--", *argv)

    # the agent holds only the placeholder; the upstream sees the real key
    env = ex("env")
    assert env.returncode == 0, env.stderr
    assert REAL_KEY not in env.stdout
    agent_env = dict(line.split("=", 1) for line in env.stdout.splitlines() if "=" in line)
    assert agent_env["E2E_API_KEY"].startswith("sk-") and agent_env["E2E_API_KEY"] != REAL_KEY
    ok = ex("curl", "-sS", "-m", "30", "https://api.example.test/v1/rootless")
    assert ok.returncode == 0, ok.stderr
    assert REAL_KEY not in ok.stdout
    hit = [s for s in w.seen(upstream) if s.get("path") == "/v1/rootless"]
    assert hit and hit[-1]["headers"].get("Authorization") == f"Bearer {REAL_KEY}", hit

    # a host the policy does not allow is refused by the gateway and never reaches the upstream
    denied = ex("curl", "-sS", "-m", "30", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                f"evil.example.test:443:{w.upstream_ip}", "https://evil.example.test/")  # fmt: skip
    assert denied.stdout == "403", (denied.stdout, denied.stderr)
    assert not [s for s in w.seen(upstream) if "evil" in str(s.get("host"))]

    # the agent writes its workspace, and the files belong to the user who ran `up`
    wrote = ex("sh", "-c", "id -u; echo from-agent > /workspace/made.txt")
    assert wrote.returncode == 0, wrote.stderr
    made = ws / "made.txt"
    assert made.read_text() == "from-agent\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (pw.pw_uid, pw.pw_gid)

    down = w.cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert w.run(lambda c: _leftovers(c, name)) == []
