"""Gateway side of the sandbox-contract check: what to attempt, and how to read the results."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from gateway.credentials.store import SecretStore
from gateway.tls.ca import CertificateAuthority

# Documentation addresses (RFC 5737 / 3849): nothing real is ever contacted.
DEFAULT_PROBES: dict[str, Any] = {
    "direct_tcp": [["192.0.2.1", 443], ["192.0.2.1", 22]],
    "ipv6_tcp": [["2001:db8::1", 443]],
    "udp": [["192.0.2.1", 9999]],
    "dns_denied": ["keyward-exfil-6b6579.example.invalid"],
    "dns_txt": ["keyward-exfil-txt.example.invalid"],
    "unix_sockets": ["/var/run/docker.sock", "/run/podman/podman.sock"],
    "scan_roots": ["/"],
    "scan_seconds": 60,
}


def check_script() -> str:
    return resources.files("gateway.pod").joinpath("contract_check.py").read_text()


def contract_spec(store: SecretStore, ca: CertificateAuthority, **probes: Any) -> dict[str, Any]:
    """Hashes (never values) of every secret, plus the attacks to attempt."""
    hashes = []
    for name in sorted(store.names() - frozenset(store.oauth())):
        value = store.get(name).reveal().encode()
        hashes.append({"len": len(value), "sha256": hashlib.sha256(value).hexdigest()})
    return {
        **DEFAULT_PROBES,
        **probes,
        "secret_hashes": hashes,
        "ca_key_line_sha256": ca.key_probe(),
    }


def parse_results(stdout: str) -> list[dict[str, Any]]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("["):
            data = json.loads(line)
            if isinstance(data, list):
                return data
    raise ValueError("the contract check printed no results")
