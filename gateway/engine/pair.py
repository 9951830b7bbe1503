"""`keyward up`: a gateway + agent pair through the engine socket (DESIGN §1 without compose).

The pure helpers (names, labels, the rewritten config, the container configs) are separate from
the orchestration so they can be tested without an engine. Secrets go to the gateway only: on the
host every source is resolved, then the gateway gets a config whose sources all read `.env` next
to it, shipped as a tar into a gateway-only volume before the container starts. Never on a command
line, never in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.cli.errors import KeywardError
from gateway.config.loader import LoadedConfig, load_config
from gateway.config.rewrite import shipped_config
from gateway.credentials.sources import load_secrets
from gateway.credentials.store import SecretStore
from gateway.engine.client import EngineClient
from gateway.engine.errors import Conflict, EngineError, NotFound
from gateway.engine.hostnet import forward_drop_problems
from gateway.engine.stream import Stream

LABEL_PAIR = "keyward.pair"
LABEL_ROLE = "keyward.role"
# A random token per `up`: what carries it was created by that `up`, so only that `up` undoes it.
LABEL_UP = "keyward.up"
DEFAULT_NAME = "default"
DEFAULT_GATEWAY_IMAGE = "localhost/keyward-gateway:dev"
DEFAULT_AGENT_IMAGE = "localhost/keyward-agent:dev"
DEFAULT_AGENT_USER = "1000:1000"
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


class PairError(KeywardError):
    """The pair could not be brought up, found or inspected."""


class NameHeld(PairError):
    """A name the pair needs belongs to something else (another pair, or not a pair at all)."""


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
        return (self.gateway, self.agent)

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
    agent_read_only: bool = False
    extra_hosts: Sequence[str] = ()
    dns: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    gateway_memory: int = GATEWAY_MEMORY
    gateway_pids: int = GATEWAY_PIDS
    agent_memory: int | None = None
    agent_pids: int = AGENT_PIDS
    ready_timeout: float = READY_TIMEOUT


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


def build_gateway_bundle(loaded: LoadedConfig, store: SecretStore) -> GatewayBundle:
    """The rewritten keyward.yaml (every source = env from `.env`), the `.env` (0600) with the
    host-resolved values, and a copy of `upstream.ca_bundle`. Validated with the real loader."""
    raw, values = shipped_config(loaded, store, lambda key: {"env": key})
    files: dict[str, tuple[bytes, int]] = {}
    upstream = raw.get("upstream") or {}
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


def gateway_config(opts: PairOptions, service_ports: Sequence[int] = ()) -> dict[str, Any]:
    """Docker-API create body for the gateway: root only until `serve` drops itself."""
    names = PairNames(opts.name)
    host: dict[str, Any] = {
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
        "RestartPolicy": {"Name": "no"},
    }
    if opts.extra_hosts:
        host["ExtraHosts"] = list(opts.extra_hosts)
    if opts.dns:
        host["Dns"] = list(opts.dns)
    body: dict[str, Any] = {
        "Image": opts.gateway_image,
        "Cmd": gateway_command(opts),
        "User": "0:0",
        "Labels": pair_labels(opts, "gateway"),
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


def parse_trust_env(text: str) -> list[str]:
    """`KEY=VALUE` lines of trust.env (CA variables + placeholders), comments dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            out.append(line)
    return out


def agent_config(opts: PairOptions, gateway_id: str, trust_env: Sequence[str]) -> dict[str, Any]:
    """Docker-API create body for the agent: joins the gateway's namespace, owns nothing."""
    names = PairNames(opts.name)
    binds = [f"{names.trust_volume}:{AGENT_TRUST}:ro"]
    if opts.workspace is not None:
        binds.append(f"{Path(opts.workspace).resolve()}:{AGENT_WORKSPACE}:rw")
    host: dict[str, Any] = {
        "NetworkMode": f"container:{gateway_id}",
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": bool(opts.agent_read_only),
        "PidsLimit": opts.agent_pids,
        "Binds": binds,
        "RestartPolicy": {"Name": "no"},
    }
    if opts.agent_read_only:
        host["Tmpfs"] = {"/tmp": "rw,nosuid,nodev,size=256m"}
    if opts.agent_memory:
        host["Memory"] = opts.agent_memory
    return {
        "Image": opts.agent_image,
        "Cmd": list(opts.command or DEFAULT_AGENT_CMD),
        "User": opts.agent_user,
        "Env": list(trust_env),
        "Labels": pair_labels(opts, "agent"),
        "HostConfig": host,
    }


# -- orchestration -----------------------------------------------------------------------------

Say = Callable[[str], object]


def _quiet(_: str) -> None:
    return None


@dataclass
class PairInfo:
    name: str
    gateway_id: str
    agent_id: str
    ready_seconds: float
    warnings: list[str] = field(default_factory=list)


async def internal_podman_networks(
    client: EngineClient, networks: Sequence[str]
) -> list[tuple[str, str]]:
    """(name, subnet) of each internal network among `networks` (for the FORWARD DROP check)."""
    out = []
    for net in networks:
        with contextlib.suppress(EngineError):
            data = await client.network_inspect(net)
            if data.get("Internal"):
                for cfg in (data.get("IPAM") or {}).get("Config") or []:
                    if cfg.get("Subnet"):
                        out.append((net, str(cfg["Subnet"])))
    return out


async def exec_text(client: EngineClient, container: str, argv: Sequence[str]) -> str:
    r = await client.exec_run(container, argv)
    if r.exit_code != 0:
        err = r.stderr.decode(errors="replace").strip()[-500:]
        raise PairError(f"{' '.join(argv[:2])} in {container} failed ({r.exit_code}): {err}")
    return r.stdout.decode(errors="replace")


async def gateway_logs(client: EngineClient, container: str, tail: int = 50) -> str:
    out = bytearray()
    with contextlib.suppress(EngineError):
        async for _, data in client.container_logs(container, tail=tail):
            out += data
    return out.decode(errors="replace")


async def wait_ready(
    client: EngineClient, container: str, timeout: float, tick: Say = _quiet
) -> float:
    """Poll for the ready file with our own probe (Podman healthchecks need systemd)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    delay = 0.05
    while True:
        state = (await client.container_inspect(container)).get("State", {})
        if not state.get("Running"):
            logs = await gateway_logs(client, container)
            raise PairError(
                f"gateway exited during start-up (status {state.get('ExitCode')}):\n{logs.strip()}"
            )
        with contextlib.suppress(EngineError):
            r = await client.exec_run(container, ["test", "-e", GW_READY])
            if r.exit_code == 0:
                return loop.time() - start
        elapsed = loop.time() - start
        if elapsed > timeout:
            logs = await gateway_logs(client, container)
            raise PairError(f"gateway not ready after {timeout:.0f} s:\n{logs.strip()}")
        tick(f"waiting for the gateway ({elapsed:.1f} s)")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def ensure_image(client: EngineClient, image: str, say: Say = _quiet) -> None:
    """Pull an image the engine lacks (progress shown); local-only names get a build hint."""
    try:
        await client.image_inspect(image)
        return
    except NotFound:
        pass
    if image.startswith("localhost/"):
        raise PairError(f"image {image} not found in the engine (scripts/build-images builds it)")

    def progress(item: Mapping[str, Any]) -> None:
        detail = item.get("progress") or ""
        say(f"pulling {image}: {item.get('status', '')} {detail}".rstrip())

    try:
        await client.image_pull(image, progress=progress)
    except EngineError as e:
        raise PairError(
            f"image {image} is not in the engine and could not be pulled: {e}"
        ) from None


class _Made:
    """What one `up` created, by id, in creation order: the only things its failure undoes."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.containers: list[str] = []
        self.volumes: list[str] = []


def _labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    """Labels of an inspected container (`Config.Labels`) or volume (`Labels`)."""
    labels = obj.get("Labels")
    if labels is None:
        labels = (obj.get("Config") or {}).get("Labels")
    return labels or {}


def _held_by(kind: str, what: str, obj: Mapping[str, Any], pair_name: str) -> PairError:
    """The error for a name that exists already: ours (pair exists) or foreign (removes nothing)."""
    owner = _labels_of(obj).get(LABEL_PAIR)
    if owner == pair_name:
        return NameHeld(
            f"pair {pair_name!r} exists already or another `keyward up` is creating it "
            f"({kind} {what}); `keyward status --name {pair_name}` shows it, "
            f"`keyward down --name {pair_name}` removes it"
        )
    return NameHeld(
        f"{kind} {what} exists and is not labelled {LABEL_PAIR}={pair_name}: keyward removes "
        f"nothing it did not create, so rename or remove it yourself, or pick another --name"
    )


async def check_names_free(client: EngineClient, name: str) -> None:
    """Refuse early, touching nothing, when a container name is taken or a volume name belongs
    to something that is not this pair (a kept state volume of this pair is reused)."""
    names = PairNames(name)
    for container in names.containers:
        try:
            found = await client.container_inspect(container)
        except NotFound:
            continue
        raise _held_by("container", container, found, name)
    for vol in names.volumes:
        try:
            found = await client.volume_inspect(vol)
        except NotFound:
            continue
        if _labels_of(found).get(LABEL_PAIR) != name:
            raise _held_by("volume", vol, found, name)


async def _ensure_volume(client: EngineClient, vol: str, opts: PairOptions, made: _Made) -> None:
    """Create `vol` unless it exists; recorded only if this `up`'s token is on it afterwards
    (Docker answers a create of an existing name with the existing volume, not an error)."""
    try:
        found = await client.volume_inspect(vol)
    except NotFound:
        # Podman answers Conflict when someone created it between our inspect and create
        with contextlib.suppress(Conflict):
            await client.volume_create(vol, labels={**pair_labels(opts), LABEL_UP: made.token})
        found = await client.volume_inspect(vol)
    labels = _labels_of(found)
    if labels.get(LABEL_UP) == made.token:
        made.volumes.append(vol)
    elif labels.get(LABEL_PAIR) != opts.name:
        raise _held_by("volume", vol, found, opts.name)


async def _create_container(
    client: EngineClient, name: str, config: dict[str, Any], opts: PairOptions, made: _Made
) -> str:
    """Create by name (the engine's atomic check: a concurrent `up` loses here, having created
    nothing that holds this name) and record the id."""
    config = {**config, "Labels": {**config.get("Labels", {}), LABEL_UP: made.token}}
    try:
        cid = await client.container_create(name, config)
    except Conflict:
        try:
            found = await client.container_inspect(name)
        except NotFound:
            found = {}
        raise _held_by("container", name, found, opts.name) from None
    made.containers.append(cid)
    return cid


async def up(
    client: EngineClient,
    loaded: LoadedConfig,
    store: SecretStore,
    opts: PairOptions,
    say: Say = _quiet,
) -> PairInfo:
    """Create and start the pair; on any failure remove exactly what this call created."""
    check_pair_name(opts.name)
    names = PairNames(opts.name)
    bundle = build_gateway_bundle(loaded, store)
    await check_names_free(client, opts.name)
    warnings: list[str] = []
    if (await client.ping()).kind == "podman":
        warnings += forward_drop_problems(await internal_podman_networks(client, opts.networks))
    for image in (opts.gateway_image, opts.agent_image):
        await ensure_image(client, image, say)
    made = _Made(secrets.token_hex(8))
    try:
        for vol in names.volumes:
            # a state volume kept by `down --keep-state` is reused: the same CA and placeholders
            await _ensure_volume(client, vol, opts, made)
        say("creating the gateway")
        gw = await _create_container(
            client, names.gateway, gateway_config(opts, bundle.service_ports), opts, made
        )
        await client.put_archive(gw, GW_CONFIG_DIR, bundle.tar())
        for net in opts.networks[1:]:
            await client.network_connect(net, gw)
        say("starting the gateway")
        await client.container_start(gw)
        ready = await wait_ready(client, gw, opts.ready_timeout, say)
        trust = parse_trust_env(await exec_text(client, gw, ["cat", f"{GW_TRUST}/trust.env"]))
        say("starting the agent")
        agent = await _create_container(
            client, names.agent, agent_config(opts, gw, trust), opts, made
        )
        await client.container_start(agent)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(undo(client, made))
        raise
    return PairInfo(opts.name, gw, agent, ready, warnings)


async def _remove_volume(client: EngineClient, vol: str) -> bool:
    """Remove a volume without `force` (Podman's force removes the containers using it, which may
    not be ours); retried while the engine still releases it. False if it was already gone."""
    for attempt in range(10):
        try:
            await client.volume_remove(vol)
            return True
        except NotFound:
            return False
        except Conflict:
            if attempt == 9:
                raise
            await asyncio.sleep(0.3)
    return False


async def undo(client: EngineClient, made: _Made) -> None:
    """Remove what one `up` created, by id, newest first; nothing else."""
    for cid in reversed(made.containers):
        with contextlib.suppress(NotFound):
            await client.container_remove(cid, force=True)
    for vol in reversed(made.volumes):
        await _remove_volume(client, vol)


async def find_pair(client: EngineClient, name: str) -> dict[str, dict[str, Any]]:
    """role -> container summary for the pair's containers."""
    out: dict[str, dict[str, Any]] = {}
    for c in await client.container_list({"label": [f"{LABEL_PAIR}={name}"]}):
        role = (c.get("Labels") or {}).get(LABEL_ROLE, "?")
        out[role] = c
    return out


async def container_of(client: EngineClient, name: str, role: str) -> str:
    found = (await find_pair(client, name)).get(role)
    if not found:
        raise PairError(f"no {role} container for pair {name!r} (keyward up --name {name})")
    return str(found["Id"])


async def down(client: EngineClient, name: str, *, keep_state: bool = False) -> list[str]:
    """Everything labelled as this pair, by id: agent first (Podman refuses the other order),
    then the rest, volumes, labelled networks. Nothing is looked up by name."""
    label = {"label": [f"{LABEL_PAIR}={name}"]}
    removed: list[str] = []
    pair = await find_pair(client, name)
    order = sorted(pair.items(), key=lambda kv: _ROLE_ORDER.get(kv[0], 0))
    for _role, c in order:
        with contextlib.suppress(NotFound):
            await client.container_remove(str(c["Id"]), force=True)
            removed.append(f"container {(c.get('Names') or [c['Id']])[0].lstrip('/')}")
    state = PairNames(name).state_volume
    for v in await client.volume_list(label):
        if keep_state and v["Name"] == state:
            continue
        if await _remove_volume(client, v["Name"]):
            removed.append(f"volume {v['Name']}")
    for n in await client.network_list(label):
        with contextlib.suppress(NotFound):
            await client.network_remove(str(n.get("Id") or n["Name"]))
            removed.append(f"network {n['Name']}")
    return removed


# Removal order in `down`: joiners before the namespace they joined.
_ROLE_ORDER = {"agent": 0, "gateway": 1, "holder": 2}


async def read_audit(client: EngineClient, gateway: str) -> list[dict[str, Any]]:
    r = await client.exec_run(gateway, ["cat", GW_AUDIT])
    if r.exit_code != 0:
        return []
    out = []
    for line in r.stdout.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


async def ready_file_present(client: EngineClient, gateway: str) -> bool:
    try:
        return (await client.exec_run(gateway, ["test", "-e", GW_READY])).exit_code == 0
    except EngineError:
        return False


async def stream_exec(
    client: EngineClient,
    container: str,
    argv: Sequence[str],
    write: Callable[[Stream, bytes], object],
    stdin: bytes | None = None,
) -> int:
    async with await client.exec_stream(container, argv, stdin=stdin) as ex:
        async for stream, data in ex:
            write(stream, data)
    return int(ex.exit_code if ex.exit_code is not None else 1)
