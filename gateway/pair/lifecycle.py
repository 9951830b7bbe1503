"""`keyward up/down/status/restart/exec`: a pair driven through the engine socket (DESIGN §1
without compose). Ownership is by label and id (`up` undoes only what it created); the holder
owns the namespace so the gateway can restart without stranding the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config.loader import LoadedConfig
from gateway.credentials.store import SecretStore
from gateway.engine.client import EngineClient, ExecStream, Stdin
from gateway.engine.errors import Conflict, EngineError, NotFound
from gateway.engine.stream import Stream
from gateway.errors import NameHeld, PairError
from gateway.pair.agent_trust import add_ca_to_system_bundles
from gateway.pair.hostnet import forward_drop_problems
from gateway.pair.spec import (
    GW_AUDIT,
    GW_CONFIG_DIR,
    GW_READY,
    GW_STATE,
    GW_TRUST,
    HOST_NAMES,
    LABEL_PAIR,
    LABEL_ROLE,
    LABEL_UP,
    READY_TIMEOUT,
    PairNames,
    PairOptions,
    agent_config,
    build_gateway_bundle,
    check_pair_name,
    engine_user_setup,
    gateway_config,
    guarded,
    holder_config,
    pair_labels,
    parse_trust_env,
)


async def host_address(client: EngineClient, opts: PairOptions, kind: str) -> str | None:
    """The host's address as seen from the pair's network: that network's gateway (the host
    side of its bridge). Unlike `host-gateway` (Docker's default bridge address, Podman >= 4.7)
    it is reachable from an internal network too, and it exists on every engine version."""
    net = opts.networks[0] if opts.networks else ("podman" if kind == "podman" else "bridge")
    try:
        data = await client.network_inspect(net)
    except EngineError:
        return None
    gateways = [
        str(c["Gateway"]) for c in (data.get("IPAM") or {}).get("Config") or [] if c.get("Gateway")
    ]
    v4 = [g for g in gateways if ":" not in g]
    found = v4 or gateways
    return found[0] if found else None


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
    holder_id: str = ""


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


async def gateway_ready(client: EngineClient, gateway: str, holder: str | None = None) -> bool:
    """The gateway serves and its rules are in the pair's namespace: the same check the agent's
    guard makes, run in the gateway, and the gateway's namespace is the holder's (a gateway
    stranded in an old namespace is ready there, which is useless to an agent in the new one)."""
    try:
        r = await client.exec_run(gateway, guarded(["true"], 0, GW_READY))
    except EngineError:
        return False
    if r.exit_code != 0:
        return False
    return holder is None or await _netns(client, holder) == await _netns(client, gateway)


async def wait_ready(
    client: EngineClient,
    container: str,
    timeout: float,
    tick: Say = _quiet,
    holder: str | None = None,
) -> float:
    """Poll for the ready stamp with our own probe (Podman healthchecks need systemd)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    delay = 0.05
    while True:
        state = (await client.container_inspect(container)).get("State", {})
        if not state.get("Running") and not state.get("Restarting"):
            logs = await gateway_logs(client, container)
            raise PairError(
                f"gateway exited during start-up (status {state.get('ExitCode')}):\n{logs.strip()}"
            )
        if state.get("Running") and await gateway_ready(client, container, holder):
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


ENV_TRUST_ONLY = "only clients that read SSL_CERT_FILE and the like trust the gateway"


async def up(
    client: EngineClient,
    loaded: LoadedConfig,
    store: SecretStore,
    opts: PairOptions,
    say: Say = _quiet,
) -> PairInfo:
    """Create and start the pair; on any failure remove exactly what this call created.

    The holder is created first: its name is the claim a concurrent `up` loses on before it
    has made anything."""
    check_pair_name(opts.name)
    names = PairNames(opts.name)
    build_gateway_bundle(loaded, store)  # a config that cannot be shipped fails before the engine
    await check_names_free(client, opts.name)
    kind = (await client.ping()).kind
    warnings: list[str] = []
    host_ip = await host_address(client, opts, kind)
    if host_ip is None:
        warnings.append(f"no host address known for the pair's network: {', '.join(HOST_NAMES)} "
                        "will not resolve for the agent")  # fmt: skip
    bundle = build_gateway_bundle(loaded, store, host_gateway=host_ip)
    userns, notes = engine_user_setup(kind, await client.engine_info(), opts)
    warnings += notes
    if userns and not opts.userns:
        opts = replace(opts, userns=userns)
    if kind == "podman":
        warnings += forward_drop_problems(await internal_podman_networks(client, opts.networks))
    for image in (opts.gateway_image, opts.agent_image):
        await ensure_image(client, image, say)
    made = _Made(secrets.token_hex(8))
    try:
        say("creating the pod")
        holder = await _create_container(
            client, names.holder, holder_config(opts, bundle.service_ports, kind), opts, made
        )
        for vol in names.volumes:
            # a state volume kept by `down --keep-state` is reused: the same CA and placeholders
            await _ensure_volume(client, vol, opts, made)
        for net in opts.networks[1:]:
            await client.network_connect(net, holder)
        await client.container_start(holder)
        say("creating the gateway")
        gw = await _create_container(
            client, names.gateway, gateway_config(opts, holder, kind), opts, made
        )
        await client.put_archive(gw, GW_CONFIG_DIR, bundle.tar())
        say("starting the gateway")
        await client.container_start(gw)
        ready = await wait_ready(client, gw, opts.ready_timeout, say, holder)
        trust = parse_trust_env(await exec_text(client, gw, ["cat", f"{GW_TRUST}/trust.env"]))
        say("starting the agent")
        agent = await _create_container(
            client, names.agent, agent_config(opts, holder, trust, kind), opts, made
        )
        if opts.agent_read_only:  # neither engine writes into a read-only root filesystem
            warnings.append(
                f"read-only agent: its system CA bundle stays the image's; {ENV_TRUST_ONLY}"
            )
        else:
            ca_pem = (await exec_text(client, gw, ["cat", f"{GW_TRUST}/ca.crt"])).encode()
            try:
                await add_ca_to_system_bundles(client, agent, ca_pem)
            except EngineError as e:
                warnings.append(
                    f"the agent's system CA bundle was not written ({e}); {ENV_TRUST_ONLY}"
                )
        await client.container_start(agent)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(undo(client, made))
        raise
    return PairInfo(opts.name, gw, agent, ready, warnings, holder)


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


ROLES = ("holder", "gateway", "agent")


@dataclass
class Member:
    role: str
    id: str = ""
    state: str = "missing"
    netns: str | None = None


@dataclass
class PairHealth:
    """What `status` reports: each member, and why the pair is degraded (empty = healthy)."""

    name: str
    members: dict[str, Member]
    ready: bool
    problems: list[str]
    credentials: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def health_of(self, role: str) -> str:
        """The health column: only the gateway has a readiness of its own."""
        if role != "gateway" or self.members[role].state != "running":
            return "-"
        return "ready" if self.ready else "not ready"

    def as_json(self) -> dict[str, Any]:
        ordered = sorted(self.members.items(), key=lambda kv: _STATUS_ORDER[kv[0]])
        return {
            "pair": self.name,
            "healthy": self.healthy,
            "problems": self.problems,
            "credentials": self.credentials,
            "members": [
                {
                    "role": r,
                    "id": m.id,
                    "state": m.state,
                    "health": self.health_of(r),
                    "netns": m.netns,
                }
                for r, m in ordered
            ],
        }


# Listing order in `status`: the gateway first, the holder last.
_STATUS_ORDER = {"gateway": 0, "agent": 1, "holder": 2}


async def _netns(client: EngineClient, container: str) -> str | None:
    with contextlib.suppress(EngineError):
        r = await client.exec_run(container, ["readlink", "/proc/self/ns/net"])
        if r.exit_code == 0:
            return r.stdout.decode(errors="replace").strip()
    return None


async def pair_health(client: EngineClient, name: str) -> PairHealth:
    """The truth about a pair: every member running, the agent and gateway in the holder's
    namespace, and the gateway's ready stamp naming that namespace."""
    found = await find_pair(client, name)
    if not found:
        raise PairError(f"no pair {name!r} (keyward up --name {name})")
    members: dict[str, Member] = {}
    problems: list[str] = []
    for role in ROLES:
        c = found.get(role)
        m = Member(role)
        members[role] = m
        if c is None:
            problems.append(f"{role} container missing (keyward down, then up)")
            continue
        m.id = str(c["Id"])
        m.state = str(c.get("State") or "?")
        if m.state != "running":
            problems.append(f"{role} is {m.state}")
            continue
        m.netns = await _netns(client, m.id)
    holder_ns = members["holder"].netns
    for role in ("gateway", "agent"):
        m = members[role]
        if m.state == "running" and holder_ns and m.netns != holder_ns:
            problems.append(f"{role} is not in the pair's network namespace")
    gw = members["gateway"]
    ready = (
        gw.state == "running"
        and gw.netns == (holder_ns or gw.netns)
        and await gateway_ready(client, gw.id)
    )
    if gw.state == "running" and not ready:
        problems.append("gateway readiness failing (no ready stamp for this namespace)")
    credentials = await credential_health(client, gw.id) if ready else {}
    for secret, h in sorted(credentials.items()):
        if h.get("failing"):
            problems.append(
                f"credential {secret!r} is failing: its upstream answered 401/403"
                f" {h.get('consecutive_auth_failures')} times in a row (rotate it; keyward reload)"
            )
    return PairHealth(name, members, ready, problems, credentials)


# Per-credential health from the gateway's control socket (`/credentials`), asked from inside
# the gateway container: the socket is in a 0700 directory no agent can reach.
GW_CONTROL = f"{GW_STATE}/control/keyward.sock"
_CREDENTIALS_PROBE = f"""
import socket
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect({GW_CONTROL!r})
s.sendall(b"GET /credentials HTTP/1.0\\r\\nHost: keyward\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode())
"""


async def credential_health(client: EngineClient, gateway: str) -> dict[str, Any]:
    """secret name -> {failing, consecutive_auth_failures}; empty when it cannot be asked."""
    with contextlib.suppress(EngineError, PairError, ValueError, IndexError):
        data = json.loads(await exec_text(client, gateway, ["python", "-c", _CREDENTIALS_PROBE]))
        if isinstance(data, dict):
            return data
    return {}


async def _restart_one(client: EngineClient, cid: str, timeout: int) -> None:
    with contextlib.suppress(Conflict, NotFound):
        await client.container_stop(cid, timeout=timeout)
    await client.container_start(cid)


async def restart(
    client: EngineClient,
    name: str,
    member: str | None = None,
    *,
    ready_timeout: float = READY_TIMEOUT,
    say: Say = _quiet,
) -> list[str]:
    """Restart a member (or the whole pair) in the order that keeps the agent guarded: holder
    (a new namespace) before the gateway, gateway ready before the agent. A dead holder means
    both members are stranded, so both restart whatever was asked."""
    found = await find_pair(client, name)
    missing = [r for r in ROLES if r not in found]
    if missing:
        raise PairError(
            f"pair {name!r} has no {', '.join(missing)} container; keyward down --name {name} "
            "and keyward up again"
        )
    ids = {r: str(found[r]["Id"]) for r in ROLES}
    done: list[str] = []
    holder_ok = found["holder"].get("State") == "running"
    if not holder_ok:
        say("starting the pod (a new network namespace)")
        for role in ("agent", "gateway"):  # joiners of the old namespace first
            with contextlib.suppress(Conflict, NotFound):
                await client.container_stop(ids[role], timeout=5)
        await client.container_start(ids["holder"])
        done.append("holder")
        member = None
    if member in (None, "gateway"):
        say("restarting the gateway")
        await _restart_one(client, ids["gateway"], 10)
        await wait_ready(client, ids["gateway"], ready_timeout, say, ids["holder"])
        done.append("gateway")
    if member in (None, "agent"):
        if not await gateway_ready(client, ids["gateway"], ids["holder"]):
            raise PairError(
                f"the gateway of pair {name!r} is not ready, so the agent stays down; "
                f"keyward restart --name {name} gateway"
            )
        say("restarting the agent")
        await _restart_one(client, ids["agent"], 10)
        done.append("agent")
    return done


async def stream_exec(
    client: EngineClient,
    container: str,
    argv: Sequence[str],
    write: Callable[[Stream, bytes], object],
    stdin: Stdin | None = None,
    *,
    tty: bool = False,
    on_start: Callable[[ExecStream], AbstractAsyncContextManager[object]] | None = None,
) -> int:
    """Run `argv`, copying stdin in and output out as it flows; the process's exit code.
    `on_start` wraps the streaming (a TTY's resize handling)."""
    async with await client.exec_stream(container, argv, stdin=stdin, tty=tty) as ex:
        ctx = on_start(ex) if on_start is not None else contextlib.nullcontext()
        async with ctx:
            async for stream, data in ex:
                write(stream, data)
    return int(ex.exit_code if ex.exit_code is not None else 1)
