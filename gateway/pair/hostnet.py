"""Facts about the engine host's own network that break pairs silently, checked before `up`.

Docker sets the FORWARD policy to DROP and turns on bridge netfilter. On a host that also runs
Podman, frames between two members of a Podman *internal* bridge then go through FORWARD, where
netavark adds no accept rule (internal networks get none), and are dropped: the gateway cannot
reach an upstream on that network and requests just time out. `up` says so, with the fix.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def forward_drop_problem(
    forward: str, docker_user: str, bridge_nf: str | None, network: str, subnet: str
) -> str | None:
    """Why traffic inside Podman internal `network` (`subnet`) is dropped on this host, or None.

    `forward` and `docker_user` are `iptables -S FORWARD` / `-S DOCKER-USER` output."""
    if (bridge_nf or "").strip() != "1":
        return None  # bridged frames do not traverse iptables at all
    if "-P FORWARD DROP" not in forward.splitlines():
        return None
    want = ipaddress.ip_network(subnet, strict=False)
    for line in docker_user.splitlines():
        words = line.split()
        if "ACCEPT" not in words or "-s" not in words or "-d" not in words:
            continue
        try:
            src = ipaddress.ip_network(words[words.index("-s") + 1], strict=False)
            dst = ipaddress.ip_network(words[words.index("-d") + 1], strict=False)
        except (ValueError, IndexError):
            continue
        if src.version == want.version and want.subnet_of(src) and want.subnet_of(dst):  # type: ignore[arg-type]
            return None
    return (
        f"Docker's FORWARD DROP policy on this host drops traffic inside Podman internal network "
        f"{network} ({subnet}), so the gateway cannot reach anything on it; allow that subnet with "
        f"`iptables -I DOCKER-USER -s {subnet} -d {subnet} -j ACCEPT`"
    )


def _iptables(*args: str) -> str | None:
    if shutil.which("iptables") is None:
        return None
    try:
        done = subprocess.run(
            ["iptables", "-w", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def forward_drop_problems(networks: Sequence[tuple[str, str]]) -> list[str]:
    """`forward_drop_problem` for each (name, subnet) of Podman internal networks, read from this
    host's iptables (nothing to say when they cannot be read: not root, or a VM-backed engine)."""
    if not networks:
        return []
    forward = _iptables("-S", "FORWARD")
    if forward is None:
        return []
    docker_user = _iptables("-S", "DOCKER-USER") or ""
    try:
        bridge_nf: str | None = BRIDGE_NF.read_text()
    except OSError:
        bridge_nf = None
    out = []
    for name, subnet in networks:
        problem = forward_drop_problem(forward, docker_user, bridge_nf, name, subnet)
        if problem:
            out.append(problem)
    return out
