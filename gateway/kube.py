"""`keyward kube render`: the pod of DESIGN §1 as Kubernetes manifests (one gateway per agent pod,
the way a service-mesh sidecar scales).

Three documents and one rule for where secrets go:
- a Secret with each resolved credential under its own key (plus the placeholder seed, so the
  fakes rendered into the agent's env are the ones the sidecar swaps), mounted only into the
  sidecar;
- a ConfigMap with the config, every secret source rewritten to a file of that Secret;
- the workload (Pod or Deployment): an init container that applies the netfilter rules (NET_ADMIN
  there only, like istio-init), the keyward sidecar (`serve --no-netfilter` as the proxy uid, no
  capabilities, probes on its control port, which the rules close to agent uids), and the agent
  (non-root, no capabilities, no privilege escalation, read-only trust volume, trust variables and
  placeholders in its env). No service-account token and no shared process namespace: the agent
  can reach the Secret neither through the API nor through the sidecar's /proc.

By default the sidecar is a native sidecar (an init container with `restartPolicy: Always` and a
startup probe, Kubernetes >= 1.29): the agent starts only once the gateway is ready and has written
the trust files. `classic_sidecar` renders it as an ordinary container instead (older clusters,
`podman kube play`); the agent may then start first, and its connections are refused, not leaked,
until the gateway is up.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.config.loader import LoadedConfig
from gateway.credentials.placeholders import SEED_FILE, SEED_SIZE
from gateway.credentials.rewrite import shipped_config
from gateway.credentials.store import SecretStore
from gateway.netfilter.rules import PodPorts
from gateway.runtime.assemble import build_placeholders
from gateway.tls.trust import agent_env

PROXY_UID = 10101
AGENT_UID = 1000
CONFIG_DIR = "/etc/keyward-gateway"
SECRETS_DIR = "/var/run/keyward/secrets"
STATE_DIR = "/var/lib/keyward/state"
TRUST_DIR = "/var/lib/keyward/trust"
AGENT_TRUST = "/etc/keyward"
DEFAULT_GATEWAY_IMAGE = "keyward-gateway:latest"
# Podman's `kube play` (4.3) runs init containers of type "once" badly; "always" is what a
# Kubernetes init container is anyway. A plain annotation: Kubernetes ignores it.
PODMAN_INIT_ANNOTATION = {"io.podman.annotations.init.container.type": "always"}


@dataclass
class KubeOptions:
    agent_image: str
    name: str = "agent"
    kind: str = "pod"  # pod | deployment
    gateway_image: str = DEFAULT_GATEWAY_IMAGE
    namespace: str | None = None
    agent_command: Sequence[str] = ()
    classic_sidecar: bool = False
    replicas: int = 1
    ports: PodPorts = field(default_factory=PodPorts)
    seed: bytes = field(default_factory=lambda: os.urandom(SEED_SIZE))


def _meta(opts: KubeOptions, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/name": "keyward", "keyward.pair": opts.name},
    }
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _restricted(uid: int) -> dict[str, Any]:
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def render(loaded: LoadedConfig, store: SecretStore, opts: KubeOptions) -> list[dict[str, Any]]:
    """The Secret, the ConfigMap and the workload, as plain data (in apply order)."""
    base = f"keyward-{opts.name}"
    raw, values = shipped_config(loaded, store, lambda key: {"file": f"{SECRETS_DIR}/{key}"})
    config_files: dict[str, str] = {}
    upstream = raw.get("upstream") or {}
    if upstream.get("ca_bundle"):
        path = loaded.base_dir / os.path.expanduser(str(upstream["ca_bundle"]))
        config_files["upstream-ca.pem"] = path.read_text(encoding="utf-8")
        upstream["ca_bundle"] = f"{CONFIG_DIR}/upstream-ca.pem"
    raw["audit"] = {**(raw.get("audit") or {}), "path": "-"}  # the container log: kubectl logs
    config_files["keyward.yaml"] = yaml.safe_dump(raw, sort_keys=False)

    data = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}
    data[SEED_FILE] = base64.b64encode(opts.seed).decode()
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(opts, f"{base}-secrets"),
        "type": "Opaque",
        "data": data,
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(opts, f"{base}-config"),
        "data": config_files,
    }
    spec = _pod_spec(loaded, store, opts, base)
    pod_meta = _meta(opts, base)
    pod_meta["annotations"] = dict(PODMAN_INIT_ANNOTATION)
    if opts.kind == "deployment":
        labels = {"app.kubernetes.io/name": "keyward", "keyward.pair": opts.name}
        workload: dict[str, Any] = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(opts, base),
            "spec": {
                "replicas": opts.replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": pod_meta["annotations"]},
                    "spec": spec,
                },
            },
        }
    else:
        workload = {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}
    return [secret, configmap, workload]


def _pod_spec(
    loaded: LoadedConfig, store: SecretStore, opts: KubeOptions, base: str
) -> dict[str, Any]:
    p = opts.ports
    services = sorted({s.listen for s in loaded.config.services.values() if s.listen})
    service_args = [a for port in services for a in ("--service-port", str(port))]
    port_args = [
        "--transparent-port", str(p.transparent),
        "--explicit-port", str(p.explicit),
        "--dns-port", str(p.dns),
        *service_args,
    ]  # fmt: skip
    init_args = [
        "netfilter", "apply", "--proxy-uid", str(PROXY_UID),
        "--control-port", str(p.control), *port_args,
    ]  # fmt: skip
    serve_args = [
        "serve", "--no-netfilter",
        "-c", f"{CONFIG_DIR}/keyward.yaml",
        "--state", STATE_DIR,
        "--proxy-uid", str(PROXY_UID),
        "--trust-dir", TRUST_DIR,
        "--trust-mount", AGENT_TRUST,
        "--ready-file", f"{TRUST_DIR}/ready",
        "--control-socket", f"{STATE_DIR}/control/keyward.sock",
        "--metrics-port", str(p.control),
        "--placeholder-seed", f"{SECRETS_DIR}/{SEED_FILE}",
        "--agent", opts.name,
        *port_args,
    ]  # fmt: skip
    init = {
        "name": "keyward-init",
        "image": opts.gateway_image,
        "args": init_args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    }
    probe = {"httpGet": {"path": "/readyz", "port": p.control}, "periodSeconds": 5}
    sidecar: dict[str, Any] = {
        "name": "keyward",
        "image": opts.gateway_image,
        "args": serve_args,
        "ports": [{"name": "metrics", "containerPort": p.control}],
        "securityContext": _restricted(PROXY_UID),
        "readinessProbe": probe,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": p.control},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "volumeMounts": [
            {"name": "keyward-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "keyward-secrets", "mountPath": SECRETS_DIR, "readOnly": True},
            {"name": "keyward-state", "mountPath": STATE_DIR},
            {"name": "keyward-trust", "mountPath": TRUST_DIR},
            # the root file system is read-only; Python and mitmproxy want a writable /tmp
            {"name": "keyward-tmp", "mountPath": "/tmp"},
        ],
    }
    env = agent_env(f"{AGENT_TRUST}/ca-bundle.crt")
    for ph in build_placeholders(loaded, store, opts.seed):
        env[ph.env] = ph.value
    agent: dict[str, Any] = {
        "name": "agent",
        "image": opts.agent_image,
        "securityContext": {**_restricted(AGENT_UID), "readOnlyRootFilesystem": False},
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "volumeMounts": [{"name": "keyward-trust", "mountPath": AGENT_TRUST, "readOnly": True}],
    }
    if opts.agent_command:
        agent["command"] = list(opts.agent_command)
    init_containers = [init]
    containers = [agent]
    if opts.classic_sidecar:
        containers.insert(0, sidecar)
    else:
        sidecar["restartPolicy"] = "Always"
        sidecar["startupProbe"] = {**probe, "periodSeconds": 1, "failureThreshold": 120}
        init_containers.append(sidecar)
    return {
        "automountServiceAccountToken": False,
        "shareProcessNamespace": False,
        "enableServiceLinks": False,
        # Secret files are root:fsGroup; 0440 lets the sidecar (gid PROXY_UID) read them.
        "securityContext": {"fsGroup": PROXY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": init_containers,
        "containers": containers,
        "volumes": [
            {"name": "keyward-config", "configMap": {"name": f"{base}-config"}},
            {
                "name": "keyward-secrets",
                "secret": {"secretName": f"{base}-secrets", "defaultMode": 0o440},
            },
            {"name": "keyward-state", "emptyDir": {}},
            {"name": "keyward-trust", "emptyDir": {"sizeLimit": "4Mi"}},
            {"name": "keyward-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        ],
    }


def to_yaml(docs: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    yaml.safe_dump_all(docs, out, sort_keys=False)
    return out.getvalue()
