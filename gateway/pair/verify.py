"""`keyward audit verify`: the sandbox contract (DESIGN §6) attempted from inside a running agent.

The check script is the one the namespace tests use (gateway.pod.contract_check), run with the
agent's own python3 as the agent's user. It gets hashes, never values: the hashes of the secrets
are computed inside the gateway (from the `.env` it was given) and, when a config is passed, on
the host from the host-resolved secrets too; the CA key line hash is computed in the gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import yaml

from gateway.credentials.store import SecretStore
from gateway.engine.client import EngineClient
from gateway.errors import PairError
from gateway.pair.lifecycle import exec_text
from gateway.pair.spec import GW_CA_KEY, GW_CONFIG, GW_CONFIG_DIR, GW_STATE
from gateway.pod.contract import DEFAULT_PROBES, check_script, contract_spec, parse_results
from gateway.tls.ca import CertificateAuthority

SCAN_ROOTS = ["/workspace", "/home", "/etc", "/tmp"]
CHECK_TIMEOUT = 300.0
CONTROL_SOCKET = "/var/lib/keyward/state/control/keyward.sock"

# Runs in the gateway (its venv python); prints hashes only.
_GATEWAY_PROBE = f"""
import hashlib, json
from pathlib import Path
from gateway.credentials.sources import read_dotenv
env = read_dotenv(Path({GW_CONFIG_DIR + "/.env"!r}))
hashes = [{{"len": len(v.encode()), "sha256": hashlib.sha256(v.encode()).hexdigest()}}
          for v in env.values()]
lines = Path({GW_CA_KEY!r}).read_bytes().splitlines()
print(json.dumps({{"secret_hashes": hashes,
                  "ca_key_line_sha256": hashlib.sha256(lines[1].strip()).hexdigest()}}))
"""


class _KeyProbe:
    """Stands in for the CA in `contract_spec`: the key line hash was computed in the gateway."""

    def __init__(self, value: str) -> None:
        self.value = value

    def key_probe(self) -> str:
        return self.value


def resolve_targets(config_text: str) -> list[tuple[str, int]]:
    """(ip, port) of every `upstream.resolve` target in the gateway's config."""
    data = yaml.safe_load(config_text) or {}
    out: list[tuple[str, int]] = []
    for target in ((data.get("upstream") or {}).get("resolve") or {}).values():
        host, _, port = str(target).rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and (host, int(port)) not in out:
            out.append((host, int(port)))
    return out


def reflect_urls(config_text: str) -> list[str]:
    """Where a reflection of a real key could come from: every named host whose rule writes a
    credential (wildcards and addresses have no one name to ask), and every service listener."""
    data = yaml.safe_load(config_text) or {}
    out: list[str] = []
    hosts = (data.get("egress") or {}).get("hosts") or {}
    for key, rule in hosts.items():
        name = str(key)
        if not isinstance(rule, dict) or not (rule.get("headers") or rule.get("basic")):
            continue
        host = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        if "*" in host or "/" in host or host.replace(".", "").isdigit() or ":" in host:
            continue
        out.append(f"https://{name}/")
    for service in (data.get("services") or {}).values():
        listen = service.get("listen") if isinstance(service, dict) else None
        if isinstance(listen, int) and listen > 0:
            out.append(f"http://127.0.0.1:{listen}/")
    return out


def build_spec(
    gateway_facts: Mapping[str, Any],
    targets: Sequence[tuple[str, int]],
    store: SecretStore | None = None,
    reflect: Sequence[str] = (),
) -> dict[str, Any]:
    """The attack list: direct TCP to each upstream address on a port without a rule and on its
    real port, documentation addresses, UDP, IPv6, DNS, engine sockets, the secret scan, and
    compressed answers asked of each credentialed destination (`reflect`)."""
    direct: list[list[Any]] = [["192.0.2.1", 443], ["192.0.2.1", 22]]
    udp: list[list[Any]] = [["192.0.2.1", 9999]]
    for ip, port in targets:
        if ":" in ip:
            continue
        for p in (9999, 22, port):
            if [ip, p] not in direct:
                direct.append([ip, p])
        udp.append([ip, 9999])
    probes: dict[str, Any] = {
        "direct_tcp": direct,
        "udp": udp,
        "unix_sockets": [*DEFAULT_PROBES["unix_sockets"], CONTROL_SOCKET],
        "control_tcp": [["127.0.0.1", 8090]],
        "scan_roots": SCAN_ROOTS,
        # The gateway's own files, by the paths it uses: the agent must not have them.
        "config_files": [GW_CONFIG, f"{GW_CONFIG_DIR}/.env"],
        "ca_key_files": [GW_CA_KEY],
        "state_dirs": [GW_STATE],
        "reflect_urls": list(reflect),
    }
    key_line = str(gateway_facts["ca_key_line_sha256"])
    hashes = list(gateway_facts.get("secret_hashes") or [])
    if store is not None:
        spec = contract_spec(store, cast(CertificateAuthority, _KeyProbe(key_line)), **probes)
        hashes += [h for h in spec["secret_hashes"] if h not in hashes]
    else:
        spec = {**DEFAULT_PROBES, **probes, "ca_key_line_sha256": key_line}
    spec["secret_hashes"] = hashes
    return spec


async def verify_pair(
    client: EngineClient, gateway: str, agent: str, store: SecretStore | None = None
) -> list[dict[str, Any]]:
    """Run every attack from inside the agent; one result dict per check."""
    facts = json.loads(await exec_text(client, gateway, ["python", "-c", _GATEWAY_PROBE]))
    config_text = await exec_text(client, gateway, ["cat", GW_CONFIG])
    spec = build_spec(facts, resolve_targets(config_text), store, reflect_urls(config_text))
    r = await asyncio.wait_for(
        client.exec_run(agent, ["python3", "-c", check_script()], stdin=json.dumps(spec).encode()),
        CHECK_TIMEOUT,
    )
    if r.exit_code not in (0, 1):
        err = r.stderr.decode(errors="replace").strip()[-500:]
        raise PairError(f"the contract check could not run in the agent ({r.exit_code}): {err}")
    try:
        return parse_results(r.stdout.decode(errors="replace"))
    except ValueError as e:
        raise PairError(f"the contract check: {e}") from None
