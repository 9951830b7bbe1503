"""`keyward kube render`: valid against the Kubernetes API schema (offline), and every secret
value only where the sidecar alone can read it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config.loader import load_config
from gateway.credentials.sources import load_secrets
from gateway.kube import KubeOptions, render
from tests.support.pki import make_ca

# The Kubernetes minor the manifests are checked against (a current one; native sidecars GA).
K8S_VERSION = "1.33"
REAL = "sk-test-KUBESECRET-0123456789abcdefXYZ"
CLIENT_SECRET = "GOCSPX-KUBEclientsecret-0123456789"
REFRESH = "1//KUBE-refresh-token-0123456789abcdef"

CONFIG = """version: 1
secrets:
  key: { env: KUBE_API_KEY }
  google:
    oauth:
      token_url: https://oauth.example.test/token
      grant: refresh_token
      client_id: { env: KUBE_CLIENT_ID }
      client_secret: { env: KUBE_CLIENT_SECRET }
      refresh_token: { env: KUBE_REFRESH }
egress:
  default: deny
  hosts:
    api.example.test:
      headers: { Authorization: "Bearer {key}" }
    "*.googleapis.test":
      headers: { Authorization: "Bearer {google}" }
placeholders:
  KUBE_API_KEY: { secret: key }
services:
  api: { listen: 8701, upstream: https://api.example.test }
upstream:
  ca_bundle: ./corp-ca.pem
"""
ENV = {
    "KUBE_API_KEY": REAL,
    "KUBE_CLIENT_ID": "client-id.apps.example.test",
    "KUBE_CLIENT_SECRET": CLIENT_SECRET,
    "KUBE_REFRESH": REFRESH,
}
SECRETS = (REAL, CLIENT_SECRET, REFRESH)


def write_ca(directory: Path) -> None:
    """upstream.ca_bundle must hold a real certificate (the loader parses it)."""
    (directory / "corp-ca.pem").write_bytes(make_ca(directory / "pki").path.read_bytes())


def docs_for(tmp_path: Path, **kw: Any) -> list[dict[str, Any]]:
    (tmp_path / "keyward.yaml").write_text(CONFIG)
    write_ca(tmp_path)
    loaded = load_config(tmp_path / "keyward.yaml")
    store = load_secrets(loaded.config.secrets, config_dir=tmp_path, environ=ENV)
    return render(loaded, store, KubeOptions(agent_image="agent:1", name="t1", **kw))


@pytest.mark.parametrize("kind", ["pod", "deployment"])
@pytest.mark.parametrize("classic", [False, True])
def test_manifests_validate_against_the_kubernetes_schema(
    tmp_path: Path, kind: str, classic: bool
) -> None:
    docs = docs_for(tmp_path, kind=kind, classic_sidecar=classic)
    assert [d["kind"] for d in docs] == ["Secret", "ConfigMap", kind.capitalize()]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught_by_the_schema(tmp_path: Path) -> None:
    """The validation above can fail: a misspelt field is refused."""
    pod = docs_for(tmp_path)[2]
    pod["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def _pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    w = docs[2]
    return w["spec"]["template"]["spec"] if w["kind"] == "Deployment" else w["spec"]


def test_secret_values_only_in_the_secret_and_only_the_sidecar_mounts_it(tmp_path: Path) -> None:
    secret, configmap, pod = docs_for(tmp_path)
    decoded = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    for value in SECRETS:
        assert value.encode() in decoded.values()
        # nowhere else: not in the ConfigMap, the workload, args or env
        assert value not in json.dumps(configmap) and value not in json.dumps(pod)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["shareProcessNamespace"] is False
    everyone = spec["initContainers"] + spec["containers"]
    mounting = [
        c["name"]
        for c in everyone
        for m in c.get("volumeMounts", ())
        if m["name"] == "keyward-secrets"
    ]
    assert mounting == ["keyward"]
    # the config reads each secret from its own file of that Secret
    config = yaml.safe_load(configmap["data"]["keyward.yaml"])
    assert config["secrets"]["key"] == {"file": "/var/run/keyward/secrets/KEYWARD_SECRET_KEY"}
    assert config["secrets"]["google"]["oauth"]["refresh_token"] == {
        "file": "/var/run/keyward/secrets/KEYWARD_SECRET_GOOGLE_REFRESH_TOKEN"
    }
    assert config["upstream"]["ca_bundle"] == "/etc/keyward-gateway/upstream-ca.pem"
    assert "BEGIN CERTIFICATE" in configmap["data"]["upstream-ca.pem"]


def test_containers_are_locked_down(tmp_path: Path) -> None:
    spec = _pod_spec(docs_for(tmp_path))
    init, sidecar = spec["initContainers"]
    (agent,) = spec["containers"]
    assert init["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_RAW"],
    }
    assert init["args"][:2] == ["netfilter", "apply"] and "8701" in init["args"]
    assert sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    assert sidecar["args"][:2] == ["serve", "--no-netfilter"]
    for c in (sidecar, agent):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and "add" not in sc["capabilities"]
    assert sidecar["securityContext"]["runAsUser"] == 10101 != agent["securityContext"]["runAsUser"]
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 8090
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["volumeMounts"] == [
        {"name": "keyward-trust", "mountPath": "/etc/keyward", "readOnly": True}
    ]
    env = {e["name"]: e["value"] for e in agent["env"]}
    assert env["SSL_CERT_FILE"] == "/etc/keyward/ca-bundle.crt"
    assert env["KUBE_API_KEY"].startswith("sk-") and env["KUBE_API_KEY"] != REAL


def test_cli_writes_a_private_file_and_names_no_secret(tmp_path: Path) -> None:
    (tmp_path / "keyward.yaml").write_text(CONFIG)
    write_ca(tmp_path)
    out = tmp_path / "agent.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "kube", "render", "-c", str(tmp_path / "keyward.yaml"),
         "--agent-image", "agent:1", "--kind", "deployment", "-o", str(out), "--", "claude"],
        env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    for value in SECRETS:
        assert value not in proc.stdout + proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert docs[2]["spec"]["template"]["spec"]["containers"][0]["command"] == ["claude"]
