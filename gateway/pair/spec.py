"""What a keyward pair is, as data: names, labels, options, the gateway's shipped config and the
Docker-API create bodies of its holder, gateway and agent. No engine calls here, so all of it is
tested without an engine; `gateway.pair.lifecycle` drives the engine with it.

Secrets go to the gateway only: on the host every source is resolved, then the gateway gets a
config whose sources all read `.env` next to it, shipped as a tar into a gateway-only volume
before the container starts. Never on a command line, never in the agent.
"""

from __future__ import annotations

import io
import re
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config.loader import LoadedConfig, load_config
from gateway.credentials.rewrite import shipped_config
from gateway.credentials.sources import load_secrets
from gateway.credentials.store import SecretStore
from gateway.engine.client import parse_version, rootless_from_info
from gateway.errors import KeywardError, PairError

LABEL_PAIR = "keyward.pair"
LABEL_ROLE = "keyward.role"
# A random token per `up`: what carries it was created by that `up`, so only that `up` undoes it.
LABEL_UP = "keyward.up"
DEFAULT_NAME = "default"
DEFAULT_GATEWAY_IMAGE = "localhost/keyward-gateway:dev"
DEFAULT_AGENT_IMAGE = "localhost/keyward-agent:dev"
# The agent's user when keyward runs as root outside sudo (no user to mirror).
DEFAULT_AGENT_USER = "1000:1000"
# Rootful Podman maps keep-id from this version on (rootless has it throughout).
KEEP_ID_ROOTFUL = (4, 5)
DEFAULT_AGENT_CMD = ("sh", "-c", "while :; do sleep 3600; done")

# Paths inside the gateway container.
GW_CONFIG_DIR = "/etc/keyward-gateway"
GW_CONFIG = f"{GW_CONFIG_DIR}/keyward.yaml"
GW_UPSTREAM_CA = f"{GW_CONFIG_DIR}/upstream-ca.pem"
GW_STATE = "/var/lib/keyward/state"
GW_TRUST = "/var/lib/keyward/trust"
GW_READY = f"{GW_TRUST}/ready"
GW_AUDIT = f"{GW_STATE}/audit.jsonl"
GW_CA_KEY = f"{GW_STATE}/ca/ca-key.pem"
# Where the agent sees the trust volume (read-only).
AGENT_TRUST = "/etc/keyward"
AGENT_WORKSPACE = "/workspace"

# What `keyward serve` needs as root before it drops to the proxy uid with no capabilities,
# each one checked by removing it: NET_ADMIN (netfilter rules), CHOWN + DAC_OVERRIDE (CA,
# placeholder seed and trust files in volumes owned by the proxy uid, then chown of the state
# dir), SETUID/SETGID (the drop), SETPCAP (emptying the bounding set; without it the drop still
# works but the bounding set keeps these capabilities). FOWNER is not needed.
GATEWAY_CAPS = ("NET_ADMIN", "CHOWN", "DAC_OVERRIDE", "SETUID", "SETGID", "SETPCAP")
GATEWAY_MEMORY = 512 * 1024 * 1024
GATEWAY_PIDS = 256
AGENT_PIDS = 4096
READY_TIMEOUT = 60.0
HOLDER_CMD = ("sleep", "infinity")
HOLDER_PIDS = 8
HOLDER_MEMORY = 32 * 1024 * 1024
# The agent's command waits this many 0.2 s polls (about a minute) for the gateway, then exits
# 124; its restart policy starts it (and the wait) again.
AGENT_START_WAITS = 300
# `keyward exec` waits less: a user is watching.
EXEC_WAITS = 50


@dataclass(frozen=True)
class PairNames:
    """Every engine object of one pair is named from the pair name."""

    pair: str

    @property
    def gateway(self) -> str:
        return f"keyward-{self.pair}-gateway"

    @property
    def agent(self) -> str:
        return f"keyward-{self.pair}-agent"

    @property
    def holder(self) -> str:
        return f"keyward-{self.pair}-pod"

    @property
    def state_volume(self) -> str:
        return f"keyward-{self.pair}-state"

    @property
    def trust_volume(self) -> str:
        return f"keyward-{self.pair}-trust"

    @property
    def config_volume(self) -> str:
        return f"keyward-{self.pair}-config"

    @property
    def containers(self) -> tuple[str, ...]:
        return (self.holder, self.gateway, self.agent)

    @property
    def volumes(self) -> tuple[str, ...]:
        return (self.state_volume, self.trust_volume, self.config_volume)


@dataclass
class PairOptions:
    name: str = DEFAULT_NAME
    gateway_image: str = DEFAULT_GATEWAY_IMAGE
    agent_image: str = DEFAULT_AGENT_IMAGE
    workspace: Path | None = None
    networks: Sequence[str] = ()
    publish_services: bool = False
    command: Sequence[str] = ()
    agent_user: str = DEFAULT_AGENT_USER
    userns: str | None = None  # "keep-id" on Podman where it exists
    agent_read_only: bool = False
    extra_hosts: Sequence[str] = ()
    dns: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    gateway_memory: int = GATEWAY_MEMORY
    gateway_pids: int = GATEWAY_PIDS
    agent_memory: int | None = None
    agent_pids: int = AGENT_PIDS
    ready_timeout: float = READY_TIMEOUT


def default_agent_user(environ: Mapping[str, str], uid: int, gid: int) -> str:
    """The invoking user's uid:gid, so files the agent writes in the workspace are the user's:
    under sudo the user behind it; as plain root (no user to mirror) 1000:1000."""
    if uid != 0:
        return f"{uid}:{gid}"
    sudo_uid, sudo_gid = environ.get("SUDO_UID", ""), environ.get("SUDO_GID", "")
    if sudo_uid.isdigit() and sudo_gid.isdigit() and sudo_uid != "0":
        return f"{sudo_uid}:{sudo_gid}"
    return DEFAULT_AGENT_USER


def engine_user_setup(
    kind: str, info: Mapping[str, Any], opts: PairOptions
) -> tuple[str | None, list[str]]:
    """(the agent's user namespace mode, what `up` must report the engine cannot apply).

    Podman: `keep-id` rootless and rootful >= 4.5 (the agent's uid is the user's uid on the
    host); older rootful Podman runs the agent as uid:gid directly, which owns files the same
    way. Memory and pids limits need the cgroup controllers: rootless on cgroup v1 has none."""
    raw_host = info.get("host")
    host: Mapping[str, Any] = raw_host if isinstance(raw_host, Mapping) else {}
    rootless = rootless_from_info(info)
    notes: list[str] = []
    userns: str | None = None
    if kind == "podman":
        version = parse_version(str((info.get("version") or {}).get("Version") or "0"))
        if rootless or version >= KEEP_ID_ROOTFUL:
            userns = "keep-id"
        controllers = set(host.get("cgroupControllers") or [])
        if rootless and str(host.get("cgroupVersion")) == "v1":
            controllers = set()
        elif not controllers:
            controllers = {"memory", "pids"}  # rootful: the engine manages them itself
    else:
        controllers = set()
        if info.get("MemoryLimit", True):
            controllers.add("memory")
        if info.get("PidsLimit", True):
            controllers.add("pids")
    limits: dict[str, list[tuple[str, object]]] = {
        "memory": [("gateway", opts.gateway_memory), ("agent", opts.agent_memory)],
        "pids": [("gateway", opts.gateway_pids), ("agent", opts.agent_pids)],
    }
    why = "rootless on cgroup v1" if rootless else "no cgroup controller for it"
    for controller, wanted in limits.items():
        who = [role for role, value in wanted if value]
        if who and controller not in controllers:
            notes.append(
                f"the engine cannot apply the {controller} limit ({why}): the "
                f"{' and '.join(who)} run without one"
            )
    return userns, notes


def check_pair_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,40}", name):
        raise PairError(f"pair name {name!r}: use lowercase letters, digits, '.', '_', '-'")
    return name


def pair_labels(opts: PairOptions, role: str | None = None) -> dict[str, str]:
    labels = {**opts.labels, LABEL_PAIR: opts.name}
    if role:
        labels[LABEL_ROLE] = role
    return labels


# -- the config the gateway gets ---------------------------------------------------------------


def _dotenv_quote(value: str) -> str:
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{out}"'


def dotenv_text(values: Mapping[str, str]) -> str:
    return "".join(f"{k}={_dotenv_quote(v)}\n" for k, v in sorted(values.items()))


@dataclass(frozen=True)
class GatewayBundle:
    """What is shipped into the gateway's config dir: file name -> (bytes, mode)."""

    files: dict[str, tuple[bytes, int]]
    service_ports: tuple[int, ...] = ()

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            now = int(time.time())
            for name, (data, mode) in sorted(self.files.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), mode, now
                info.uid = info.gid = 0
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()


# The names engines give the host; keyward maps them for the gateway (see host_gateway_resolve).
HOST_NAMES = ("host.containers.internal", "host.docker.internal")


def host_gateway_resolve(
    rule_keys: Sequence[str], existing: Mapping[str, str], address: str
) -> dict[str, str]:
    """`upstream.resolve` entries sending each policy rule that names the host to `address`.

    Through these, the gateway's DNS answers the name (only when the policy allows it, like any
    name) and its transparent planes accept a connection to `address` as that name, whatever the
    agent resolved it with. A rule with a port maps that port; a bare name maps 80 and 443."""
    out: dict[str, str] = {}
    for key in rule_keys:
        host, sep, port = str(key).lower().rpartition(":")
        if not (sep and port.isdigit()):
            host, port = str(key).lower(), ""
        if host.rstrip(".") not in HOST_NAMES:
            continue
        for p in [port] if port else ["80", "443"]:
            entry = f"{host.rstrip('.')}:{p}"
            if entry not in existing:
                out[entry] = f"{address}:{p}"
    return out


def build_gateway_bundle(
    loaded: LoadedConfig, store: SecretStore, *, host_gateway: str | None = None
) -> GatewayBundle:
    """The rewritten keyward.yaml (every source = env from `.env`), the `.env` (0600) with the
    host-resolved values, and a copy of `upstream.ca_bundle`. Validated with the real loader.
    `host_gateway`: the host's address, for rules naming host.docker.internal & co."""
    raw, values = shipped_config(loaded, store, lambda key: {"env": key})
    files: dict[str, tuple[bytes, int]] = {}
    upstream = raw.get("upstream") or {}
    if host_gateway:
        rules = list((raw.get("egress") or {}).get("hosts") or {})
        extra = host_gateway_resolve(rules, upstream.get("resolve") or {}, host_gateway)
        if extra:
            upstream["resolve"] = {**(upstream.get("resolve") or {}), **extra}
            raw["upstream"] = upstream
    ca_bundle = upstream.get("ca_bundle")
    if ca_bundle:
        path = Path(ca_bundle).expanduser()
        if not path.is_absolute():
            path = loaded.base_dir / path
        try:
            files["upstream-ca.pem"] = (path.read_bytes(), 0o644)
        except OSError as e:
            raise PairError(f"upstream.ca_bundle {ca_bundle}: {e.strerror or e}") from None
        upstream["ca_bundle"] = GW_UPSTREAM_CA
        raw["upstream"] = upstream
    text = yaml.safe_dump(raw, sort_keys=False)
    files["keyward.yaml"] = (text.encode(), 0o644)
    files[".env"] = (dotenv_text(values).encode(), 0o600)
    _validate_bundle(files, set(store.names()))
    services = tuple(
        sorted({s.listen for s in loaded.config.services.values() if getattr(s, "listen", None)})
    )
    return GatewayBundle(files, services)


def _validate_bundle(files: Mapping[str, tuple[bytes, int]], names: set[str]) -> None:
    """Load the rewritten config exactly as the gateway will, from `.env` only."""
    with tempfile.TemporaryDirectory(prefix="keyward-bundle-") as tmp:
        d = Path(tmp)
        for name, (data, mode) in files.items():
            p = d / name
            p.write_bytes(data)
            p.chmod(mode)
        text = (d / "keyward.yaml").read_text()
        if "upstream-ca.pem" in files:
            text = text.replace(GW_UPSTREAM_CA, str(d / "upstream-ca.pem"))
            (d / "keyward.yaml").write_text(text)
        try:
            loaded = load_config(d / "keyward.yaml")
            store = load_secrets(loaded.config.secrets, config_dir=d, environ={})
        except KeywardError as e:
            raise PairError(f"internal: the gateway's rewritten config does not load: {e}") from e
    if set(store.names()) != names:
        raise PairError("internal: the rewritten config lost a secret")


# -- container configs -------------------------------------------------------------------------


def gateway_command(opts: PairOptions) -> list[str]:
    return [
        "serve",
        "-c", GW_CONFIG,
        "--state", GW_STATE,
        "--trust-dir", GW_TRUST,
        "--trust-mount", AGENT_TRUST,
        "--ready-file", GW_READY,
        "--audit", GW_AUDIT,
        "--agent", opts.name,
    ]  # fmt: skip


def restart_policy(kind: str) -> dict[str, str]:
    """Bring the pair back after an engine restart. Podman: `always`, the policy its
    podman-restart.service starts at boot; Docker: `unless-stopped`, so a member a user stopped
    on purpose stays stopped. The order that keeps the agent guarded does not come from the
    engine (it starts members in any order): the agent waits for the gateway's stamp."""
    return {"Name": "always" if kind == "podman" else "unless-stopped"}


def holder_config(
    opts: PairOptions, service_ports: Sequence[int] = (), kind: str = "docker"
) -> dict[str, Any]:
    """The namespace owner: a process that does nothing (Kubernetes' pause container), from the
    gateway image so no other image is needed. It carries everything that belongs to the
    namespace (networks, published ports, /etc/hosts entries, DNS), as joiners may set none.
    The same on both engines: a libpod pod would need libpod-format members (README, pairs)."""
    host: dict[str, Any] = {
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": True,
        "PidsLimit": HOLDER_PIDS,
        "Memory": HOLDER_MEMORY,
        "RestartPolicy": restart_policy(kind),
    }
    if opts.extra_hosts:
        host["ExtraHosts"] = list(opts.extra_hosts)
    if opts.dns:
        host["Dns"] = list(opts.dns)
    if opts.userns:
        # the namespace's user namespace is the holder's too: a joiner of another user namespace
        # cannot mount /sys for it (rootless Podman 4.3: "mount sysfs: operation not permitted")
        host["UsernsMode"] = opts.userns
    body: dict[str, Any] = {
        "Image": opts.gateway_image,
        "Entrypoint": list(HOLDER_CMD),
        "Cmd": [],
        "User": "65534:65534",
        "StopSignal": "SIGKILL",  # sleep as pid 1 ignores SIGTERM; it holds no state
        "Labels": pair_labels(opts, "holder"),
        "HostConfig": host,
    }
    if opts.networks:
        host["NetworkMode"] = opts.networks[0]
        body["NetworkingConfig"] = {"EndpointsConfig": {opts.networks[0]: {}}}
    if opts.publish_services and service_ports:
        body["ExposedPorts"] = {f"{p}/tcp": {} for p in service_ports}
        host["PortBindings"] = {
            f"{p}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(p)}] for p in service_ports
        }
    return body


def gateway_config(opts: PairOptions, holder_id: str, kind: str = "docker") -> dict[str, Any]:
    """Docker-API create body for the gateway: root only until `serve` drops itself; joins the
    holder's namespace, so it can restart without taking the namespace (or its rules) away."""
    names = PairNames(opts.name)
    host: dict[str, Any] = {
        "NetworkMode": f"container:{holder_id}",
        "CapDrop": ["ALL"],
        "CapAdd": list(GATEWAY_CAPS),
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": True,
        "Tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m"},
        "PidsLimit": opts.gateway_pids,
        "Memory": opts.gateway_memory,
        "Binds": [
            f"{names.state_volume}:{GW_STATE}:rw",
            f"{names.trust_volume}:{GW_TRUST}:rw",
            f"{names.config_volume}:{GW_CONFIG_DIR}:rw",
        ],
        "RestartPolicy": restart_policy(kind),
    }
    if opts.userns:
        # iptables' owner match is refused (EINVAL) from outside the netns's user namespace
        host["UsernsMode"] = f"container:{holder_id}"
    return {
        "Image": opts.gateway_image,
        "Cmd": gateway_command(opts),
        "User": "0:0",
        "Labels": pair_labels(opts, "gateway"),
        "HostConfig": host,
    }


# Runs before anything else in every agent process keyward starts (the container's command and
# `keyward exec`): wait until the gateway's ready file names this very network namespace and an
# abstract socket the gateway holds in it (listed in this namespace's /proc/net/unix). The
# gateway writes it only after its rules are in; a file from an earlier namespace (engine
# restart, pod recreated) names no live socket here. POSIX sh; needs sh, readlink, cat, sleep.
AGENT_GUARD = (
    "f=$1; n=$2; shift 2; i=0; me=$(readlink /proc/self/ns/net); "
    'live() { s=$(cat "$f" 2>/dev/null) || return 1; set -- $s; '
    '[ "$1" = "$me" ] && [ -n "$2" ] || return 1; '
    'while read -r l; do case $l in *" $2") return 0 ;; esac; done < /proc/net/unix; return 1; }; '
    "until live; do "
    'i=$((i + 1)); if [ "$i" -gt "$n" ]; then '
    'echo "keyward: the gateway of this pod is not ready; not starting $1" >&2; exit 124; fi; '
    'sleep 0.2 2>/dev/null || sleep 1; done; exec "$@"'
)


def guarded(argv: Sequence[str], waits: int, ready: str = f"{AGENT_TRUST}/ready") -> list[str]:
    """`argv` behind AGENT_GUARD, polling at most `waits` times (0: check once); `ready` is
    where the ready file is mounted (the gateway itself has it elsewhere)."""
    return ["/bin/sh", "-c", AGENT_GUARD, "keyward-guard", ready, str(waits), *argv]


def parse_trust_env(text: str) -> list[str]:
    """`KEY=VALUE` lines of trust.env (CA variables + placeholders), comments dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            out.append(line)
    return out


def agent_config(
    opts: PairOptions, holder_id: str, trust_env: Sequence[str], kind: str = "docker"
) -> dict[str, Any]:
    """Docker-API create body for the agent: joins the holder's namespace, owns nothing, and
    starts its command only once the gateway's rules are in that namespace."""
    names = PairNames(opts.name)
    binds = [f"{names.trust_volume}:{AGENT_TRUST}:ro"]
    if opts.workspace is not None:
        binds.append(f"{Path(opts.workspace).resolve()}:{AGENT_WORKSPACE}:rw")
    host: dict[str, Any] = {
        "NetworkMode": f"container:{holder_id}",
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": bool(opts.agent_read_only),
        "PidsLimit": opts.agent_pids,
        "Binds": binds,
        "RestartPolicy": restart_policy(kind),
    }
    if opts.agent_read_only:
        host["Tmpfs"] = {"/tmp": "rw,nosuid,nodev,size=256m"}
    if opts.agent_memory:
        host["Memory"] = opts.agent_memory
    if opts.userns:
        host["UsernsMode"] = f"container:{holder_id}"  # the holder's keep-id, which owns the netns
    cmd = guarded(list(opts.command or DEFAULT_AGENT_CMD), AGENT_START_WAITS)
    return {
        "Image": opts.agent_image,
        "Entrypoint": cmd[:1],
        "Cmd": cmd[1:],
        "User": opts.agent_user,
        "Env": list(trust_env),
        "Labels": pair_labels(opts, "agent"),
        "HostConfig": host,
    }
