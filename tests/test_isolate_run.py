"""`sudo keyward run --isolate -c FILE -- CMD`, exactly as the README tells a user to type it.

The command builds its own namespace and uplink to the host; nothing here builds the pod. The
fake upstream lives on the host's side of that uplink: in a second namespace this test creates,
reached from the host by a /32 route, so the agent's request crosses the real uplink (NAT and
forwarding on the host) after the gateway let it out.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.pod.netns import NetNamespace, VethLink, ip
from tests.support.upstream import start_in_namespace

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
REAL_KEY = "sk-test-ISOLATESECRET-0123456789abcdefXYZ"
LINK_HOST, LINK_UP = "198.51.100.253", "198.51.100.254"

CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "{api}:443"
audit:
  path: {audit}
"""


def keyward_argv() -> list[str]:
    """The installed console script, as a user runs it (falls back to the module)."""
    script = Path(sys.executable).parent / "keyward"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


def host_routes() -> str:
    return ip("-4", "route", "show")


@dataclass
class HostSideUpstream:
    ns: NetNamespace
    api: str
    dir: Path

    def seen(self) -> list[dict[str, object]]:
        log = self.dir / "seen.jsonl"
        return [json.loads(x) for x in log.read_text().splitlines() if x] if log.exists() else []


@pytest.fixture
def upstream(root_ok: None, tmp_path: Path) -> Iterator[HostSideUpstream]:
    """A fake upstream on the host's side: its own namespace, a veth to the host, a host route."""
    used = host_routes()
    free = [n for n in range(20, 250) if f"203.0.113.{n} " not in used]
    api = f"203.0.113.{random.choice(free)}"
    up_dir = Path(tempfile.mkdtemp(prefix="keyward-isoup-"))
    with NetNamespace() as ns:
        link = VethLink(None, ns)
        with link:
            link.add_address("left", f"{LINK_HOST}/32")
            link.add_address("right", f"{LINK_UP}/32")
            link.add_address("right", f"{api}/32")
            ip("route", "add", f"{LINK_UP}/32", "dev", link.left_name)
            ip("route", "add", f"{api}/32", "via", LINK_UP, "dev", link.left_name)
            ip("route", "add", f"{LINK_HOST}/32", "dev", link.right_name, netns=ns.name)
            ip("route", "add", "default", "via", LINK_HOST, netns=ns.name)
            proc = start_in_namespace(ns, up_dir, [api], ["api.example.test"])
            try:
                yield HostSideUpstream(ns, api, up_dir)
            finally:
                ns.stop(proc)
    shutil.rmtree(up_dir, ignore_errors=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """A work dir the gateway's uid can enter once it has dropped root (pytest's is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="keyward-iso-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.update(TEST_API_KEY=REAL_KEY, KEYWARD_STATE=str(state), PYTHONPATH=str(ROOT))
    return env


def test_readme_isolate_command_injects_the_key_through_the_real_uplink(
    upstream: HostSideUpstream, base: Path
) -> None:
    audit = base / "audit.jsonl"
    config = base / "keyward.yaml"
    config.write_text(
        CONFIG.format(ca=upstream.dir / "pki" / "test-ca.pem", api=upstream.api, audit=audit)
    )
    argv = [*keyward_argv(), "run", "--isolate", "-c", str(config), "--",
            "curl", "-sS", "--max-time", "20", "https://api.example.test/isolated"]  # fmt: skip
    r = subprocess.run(
        argv, env=user_env(base / "state"), capture_output=True, text=True, timeout=120, cwd=base
    )
    assert r.returncode == 0, r.stderr
    assert "isolated run finished" in r.stderr
    echoed = json.loads(r.stdout)
    assert echoed["headers"]["Authorization"] == "Bearer [REDACTED]"
    hit = [s for s in upstream.seen() if s.get("path") == "/isolated"]
    assert len(hit) == 1
    assert hit[0]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    assert hit[0]["local"] == upstream.api
    records = [json.loads(x) for x in audit.read_text().splitlines() if x]
    rec = next(x for x in records if x["path"] == "/isolated")
    assert rec["decision"] == "allow" and rec["host"] == "api.example.test"
    assert rec["injected"] == [{"secret": "key", "location": "header:Authorization"}]
    assert REAL_KEY not in r.stdout + r.stderr + audit.read_text()
    # the uplink left nothing behind: no rule tagged with its namespace, no namespace
    ns = r.stderr.split("(namespace ", 1)[1].split(" ", 1)[0]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert f"keyward-isolate {ns}" not in rules
    assert ns not in ip("netns", "list")


def test_isolate_refuses_a_state_dir_the_gateway_uid_cannot_enter(tmp_path: Path) -> None:
    """`sudo` keeps a state dir under a 0700 home: say so before building anything."""
    locked = tmp_path / "home"
    locked.mkdir(mode=0o700)
    config = tmp_path / "keyward.yaml"
    config.write_text("version: 1\n")
    argv = [*keyward_argv(), "run", "--isolate", "-c", str(config), "--", "true"]
    r = subprocess.run(
        argv, env=user_env(locked / "state"), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert f"cannot enter {locked}" in r.stderr and "--state" in r.stderr


# CMD for the drain test: ignores SIGTERM (as an agent finishing its turn would), reads a
# stream that stalls for 30 s after its first chunk, and says when that chunk has arrived.
STALLED_READER = """
import signal, urllib.request
signal.signal(signal.SIGTERM, lambda *_: None)
r = urllib.request.urlopen("https://api.example.test/stall", timeout=300)
print(r.readline().decode().strip(), flush=True)
try:
    r.read()
    print("ended", flush=True)
except Exception as e:
    print("cut", type(e).__name__, flush=True)
"""


def serve_argv_of(config: Path) -> list[str]:
    """The command line of the `keyward serve` that `run --isolate` started for `config`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in argv and str(config) in argv:
            return argv
    return []


def test_isolate_sigterm_drains_its_gateway_within_drain(
    upstream: HostSideUpstream, base: Path
) -> None:
    """SIGTERM to `run --isolate` is what it is to `run`: CMD gets it, the gateway (started with
    `--drain`) stops accepting and cuts a stream still live after the bound, audited as
    `gateway-stopping`; CMD, still running with no gateway, is then stopped."""
    audit = base / "audit.jsonl"
    config = base / "keyward.yaml"
    config.write_text(
        CONFIG.format(ca=upstream.dir / "pki" / "test-ca.pem", api=upstream.api, audit=audit)
    )
    argv = [*keyward_argv(), "run", "--isolate", "--drain", "1", "-c", str(config), "--",
            "/usr/bin/python3", "-c", STALLED_READER]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env=user_env(base / "state"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=base,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "first chunk"  # the stream is live
        serve = serve_argv_of(config)
        assert serve[serve.index("--drain") + 1] == "1", serve
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # a hang bound: the stall alone lasts 30 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "isolated run finished" in err, err
    records = [json.loads(x) for x in audit.read_text().splitlines() if x]
    [rec] = [r for r in records if r["path"] == "/stall"]
    assert rec["reason"] == "gateway-stopping", rec
