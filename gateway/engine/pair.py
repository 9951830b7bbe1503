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
from gateway.engine.stream import Stream

LABEL_PAIR = "keyward.pair"
LABEL_ROLE = "keyward.role"
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


async def up(
    client: EngineClient,
    loaded: LoadedConfig,
    store: SecretStore,
    opts: PairOptions,
    say: Say = _quiet,
) -> PairInfo:
    """Create and start the pair; on any failure remove whatever was created."""
    check_pair_name(opts.name)
    names = PairNames(opts.name)
    bundle = build_gateway_bundle(loaded, store)
    existing = await find_pair(client, opts.name)
    if "gateway" in existing or "agent" in existing:
        raise PairError(f"pair {opts.name!r} exists already (keyward down --name {opts.name})")
    for image in (opts.gateway_image, opts.agent_image):
        await ensure_image(client, image, say)
    made: list[str] = []
    try:
        for vol in (names.state_volume, names.trust_volume, names.config_volume):
            try:
                await client.volume_inspect(vol)
                continue  # kept by `down --keep-state`: the same CA and placeholders again
            except NotFound:
                pass
            await client.volume_create(vol, labels=pair_labels(opts))
            made.append(vol)
        say("creating the gateway")
        gw = await client.container_create(
            names.gateway, gateway_config(opts, bundle.service_ports)
        )
        await client.put_archive(gw, GW_CONFIG_DIR, bundle.tar())
        for net in opts.networks[1:]:
            await client.network_connect(net, gw)
        say("starting the gateway")
        await client.container_start(gw)
        ready = await wait_ready(client, gw, opts.ready_timeout, say)
        trust = parse_trust_env(await exec_text(client, gw, ["cat", f"{GW_TRUST}/trust.env"]))
        say("starting the agent")
        agent = await client.container_create(names.agent, agent_config(opts, gw, trust))
        await client.container_start(agent)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(_undo(client, names, made))
        raise
    return PairInfo(opts.name, gw, agent, ready)


async def _undo(client: EngineClient, names: PairNames, volumes: Sequence[str]) -> None:
    """Remove what a failed `up` created (by name: other labelled objects are not ours)."""
    for container in (names.agent, names.gateway):
        with contextlib.suppress(NotFound):
            await client.container_remove(container, force=True)
    for vol in volumes:
        with contextlib.suppress(NotFound):
            await client.volume_remove(vol, force=True)


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
    """Agent first (Podman refuses the other order), gateway, volumes, labelled networks."""
    label = {"label": [f"{LABEL_PAIR}={name}"]}
    removed: list[str] = []
    pair = await find_pair(client, name)
    order = sorted(pair.items(), key=lambda kv: 0 if kv[0] != "gateway" else 1)
    for _role, c in order:
        with contextlib.suppress(NotFound):
            await client.container_remove(str(c["Id"]), force=True)
            removed.append(f"container {(c.get('Names') or [c['Id']])[0].lstrip('/')}")
    state = PairNames(name).state_volume
    for v in await client.volume_list(label):
        if keep_state and v["Name"] == state:
            continue
        for attempt in range(5):
            try:
                await client.volume_remove(v["Name"], force=True)
                removed.append(f"volume {v['Name']}")
                break
            except NotFound:
                break
            except Conflict:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5)
    for n in await client.network_list(label):
        with contextlib.suppress(NotFound):
            await client.network_remove(str(n.get("Id") or n["Name"]))
            removed.append(f"network {n['Name']}")
    return removed


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
