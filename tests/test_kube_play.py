"""The manifests of `keyward kube render`, run for real with `podman kube play`, and attacked
from the agent container the way `keyward audit verify` attacks an engine pair.

Podman 4.3's `kube play` mishandles Secrets (a `secret:` volume without `optional:` panics it;
mounted files hold the value still base64-encoded; `secretKeyRef` fails). Real Kubernetes has none
of these bugs, so the rendered manifest stays standard, and this test plays a copy in which the
Secret volume is a hostPath directory holding the decoded values, with the ownership and mode
Kubernetes gives a Secret volume (root:fsGroup, 0440). The sidecar is rendered as a classic
container (`--classic-sidecar`): Podman 4.3 runs every init container to completion first.
Everything else is played as rendered. Traffic stays on an `Internal: true` network this test
creates, with a fake upstream container on it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import pair
from gateway.config.loader import load_config
from gateway.credentials.sources import load_secrets
from gateway.engine.client import EngineClient
from gateway.kube import PROXY_UID, KubeOptions, render, to_yaml
from gateway.pair.verify import build_spec, resolve_targets
from gateway.pod.contract import check_script, parse_results
from tests.test_e2e_engines import (
    SOCKETS,
    TEST_LABELS,
    UP_DIR,
    _allow_intra_network,
    _start_upstream,
    require_engine,
)

pytestmark = pytest.mark.engine

REAL_KEY = "sk-test-KUBEPLAYSECRET-0123456789abcdef"
CONFIG = """version: 1
secrets:
  key: {{ env: KUBE_E2E_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
    other.example.test: {{}}
placeholders:
  KUBE_E2E_KEY: {{ secret: key }}
upstream:
  ca_bundle: ./upstream-ca.pem
  resolve:
    "api.example.test:443": "{ip}:443"
    "other.example.test:443": "{ip}:443"
"""


@dataclass
class Played:
    name: str
    pod: str
    upstream: str
    manifest: Path
    rendered: list[dict[str, Any]]
    store: Any

    def exec(self, container: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            ["podman", "exec", *(["-i"] if stdin is not None else []),
             f"{self.pod}-{container}", *argv],
            input=stdin, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.exec("agent", "curl", "-sS", "--max-time", "30", *args)  # a hang bound

    def seen(self) -> list[dict[str, Any]]:
        r = subprocess.run(
            ["podman", "exec", self.upstream, "cat", f"{UP_DIR}/run/seen.jsonl"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def play_copy(docs: list[dict[str, Any]], secret_dir: Path) -> list[dict[str, Any]]:
    """The rendered manifest with its Secret turned into a hostPath dir, and its emptyDirs into
    fresh 0777 hostPath dirs, as Kubernetes creates an emptyDir (Podman 4.3 makes an emptyDir a
    named volume owned by whichever image's mount point it copies up first)."""
    secret, configmap, pod = docs
    secret_dir.mkdir(mode=0o755)
    for key, value in secret["data"].items():
        path = secret_dir / key
        path.write_bytes(base64.b64decode(value))
        os.chown(path, 0, PROXY_UID)
        path.chmod(0o440)
    pod = json.loads(json.dumps(pod))
    for vol in pod["spec"]["volumes"]:
        if "secret" in vol:
            del vol["secret"]
            vol["hostPath"] = {"path": str(secret_dir), "type": "Directory"}
        elif "emptyDir" in vol:
            empty = secret_dir.parent / vol["name"]
            empty.mkdir()
            empty.chmod(0o777)
            del vol["emptyDir"]
            vol["hostPath"] = {"path": str(empty), "type": "Directory"}
    return [configmap, pod]


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Played]:
    require_engine("podman")
    if shutil.which("podman") is None:
        pytest.fail("the podman CLI is needed for `podman kube play`")
    sock = SOCKETS["podman"]
    name = f"kube-{secrets.token_hex(3)}"
    labels = {**TEST_LABELS, pair.LABEL_PAIR: name}
    base = tmp_path_factory.mktemp("kube")
    net = f"keyward-{name}-net"

    async def engine(fn: Any) -> Any:
        async with EngineClient(sock) as c:
            return await fn(c)

    rule: list[str] | None = None
    manifest = base / "play.yaml"
    try:
        asyncio.run(engine(lambda c: c.network_create(net, internal=True, labels=labels)))
        ipam = asyncio.run(engine(lambda c: c.network_inspect(net)))["IPAM"]["Config"]
        rule = _allow_intra_network("podman", ipam[0]["Subnet"], name)
        upstream, ip, ca = asyncio.run(engine(lambda c: _start_upstream(c, name, net)))
        (base / "upstream-ca.pem").write_bytes(ca)
        (base / "keyward.yaml").write_text(CONFIG.format(ip=ip))
        loaded = load_config(base / "keyward.yaml")
        store = load_secrets(
            loaded.config.secrets, config_dir=base, environ={"KUBE_E2E_KEY": REAL_KEY}
        )
        opts = KubeOptions(
            agent_image=pair.DEFAULT_AGENT_IMAGE,
            gateway_image=os.environ.get("KEYWARD_TEST_GATEWAY_IMAGE", pair.DEFAULT_GATEWAY_IMAGE),
            name=name,
            classic_sidecar=True,
            agent_command=["sh", "-c", "while :; do sleep 3600; done"],
        )
        docs = render(loaded, store, opts)
        manifest.write_text(to_yaml(play_copy(docs, base / "secrets")))
        t0 = time.monotonic()
        r = subprocess.run(
            ["podman", "kube", "play", "--network", net, str(manifest)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        played = Played(name, f"keyward-{name}", upstream, manifest, docs, store)
        deadline = time.monotonic() + 90
        while played.exec("agent", "test", "-e", "/etc/keyward/ready").returncode != 0:
            if time.monotonic() > deadline:
                logs = subprocess.run(["podman", "logs", f"{played.pod}-keyward"], capture_output=True, text=True, check=False)  # fmt: skip
                text = logs.stdout + logs.stderr
                pytest.fail(f"the sidecar never became ready: {text[:1500]} ... {text[-1500:]}")
            time.sleep(0.5)
        rss = played.exec("keyward", "grep", "VmRSS", "/proc/1/status").stdout.split()
        print(
            f"\npodman kube play -> sidecar ready in {time.monotonic() - t0:.2f} s,"
            f" idle RSS {' '.join(rss[1:3])}"
        )
        yield played
    finally:
        subprocess.run(["podman", "kube", "down", str(manifest)], capture_output=True, check=False, timeout=120)  # fmt: skip

        async def cleanup(c: EngineClient) -> None:
            for ct in await c.container_list({"label": [f"{pair.LABEL_PAIR}={name}"]}):
                await c.container_remove(ct["Id"], force=True)
            # `podman kube down` (4.3) leaves the ConfigMap's volume behind
            subprocess.run(["podman", "volume", "rm", "-f", f"keyward-{name}-config"], capture_output=True, check=False)  # fmt: skip
            for n in await c.network_list({"label": [f"{pair.LABEL_PAIR}={name}"]}):
                await c.network_remove(n["Id"])

        asyncio.run(engine(cleanup))
        if rule is not None:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


def test_key_is_injected_for_the_agent(played: Played) -> None:
    r = played.curl("https://api.example.test/v1/kube")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headers"]["Authorization"] == "Bearer [REDACTED]"
    hit = [s for s in played.seen() if s.get("path") == "/v1/kube"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"


def test_agent_env_holds_the_rendered_placeholder_that_the_sidecar_swaps(played: Played) -> None:
    env = dict(
        line.split("=", 1)
        for line in played.exec("agent", "env").stdout.splitlines()
        if "=" in line
    )
    fake = env["KUBE_E2E_KEY"]
    assert fake != REAL_KEY and REAL_KEY not in json.dumps(env)
    r = played.curl("-H", f"X-Echo-Key: {fake}", "https://api.example.test/v1/ph")
    assert r.returncode == 0, r.stderr
    hit = [s for s in played.seen() if s.get("path") == "/v1/ph"]
    headers = {k.lower(): v for k, v in hit[-1]["headers"].items()}
    assert headers["x-echo-key"] == REAL_KEY  # swapped by the sidecar


def test_denied_host_gets_403_and_direct_egress_fails(played: Played) -> None:
    r = played.curl("-o", "/dev/null", "-w", "%{http_code}", "https://evil.example.test/x")
    assert r.stdout.strip() in ("403", "000")
    assert not any(s.get("path") == "/x" for s in played.seen())
    ip = next(iter(resolve_targets(played.rendered[1]["data"]["keyward.yaml"])))[0]
    direct = played.exec("agent", "curl", "-sS", "--max-time", "5", "-k", f"https://{ip}/direct")
    assert not any(s.get("path") == "/direct" for s in played.seen()), direct.stdout


def test_sandbox_contract_holds(played: Played) -> None:
    key = played.exec(
        "keyward", "python", "-c",
        "import hashlib,sys; l=open('/var/lib/keyward/state/ca/ca-key.pem','rb').read().splitlines();"
        "print(hashlib.sha256(l[1].strip()).hexdigest())",
    )  # fmt: skip
    assert key.returncode == 0, key.stderr
    facts = {"ca_key_line_sha256": key.stdout.strip(), "secret_hashes": []}
    targets = resolve_targets(played.rendered[1]["data"]["keyward.yaml"])
    spec = build_spec(facts, targets, played.store)
    spec["scan_roots"] = ["/etc", "/tmp", "/home", "/run", "/var/run"]
    r = played.exec("agent", "python3", "-c", check_script(), stdin=json.dumps(spec))
    results = parse_results(r.stdout)
    failed = [x for x in results if not x["ok"]]
    assert results and not failed, failed
    assert hashlib.sha256(REAL_KEY.encode()).hexdigest() in json.dumps(spec)  # it looked for it


def test_metrics_port_answers_the_pod_but_not_the_agent(played: Played) -> None:
    inside = played.exec(
        "keyward", "python", "-c",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8090/metrics').read().decode())",
    )  # fmt: skip
    assert inside.returncode == 0 and "keyward_requests_total" in inside.stdout, inside.stderr
    agent = played.curl("http://127.0.0.1:8090/metrics")
    assert agent.returncode != 0 and "keyward_requests" not in agent.stdout
