"""Keyward's gateway + agent pairs on a container engine: what a pair is (`spec`), bringing it
up, checking and restarting it (`lifecycle`), attacking it from inside (`verify`), and host
facts that break it silently (`hostnet`). The engine client itself is `gateway.engine`."""

from gateway.errors import NameHeld, PairError
from gateway.pair.lifecycle import (
    PairHealth,
    PairInfo,
    container_of,
    down,
    gateway_logs,
    internal_podman_networks,
    pair_health,
    restart,
    up,
    wait_ready,
)
from gateway.pair.spec import (
    DEFAULT_AGENT_IMAGE,
    DEFAULT_GATEWAY_IMAGE,
    DEFAULT_NAME,
    GATEWAY_CAPS,
    LABEL_PAIR,
    LABEL_ROLE,
    PairNames,
    PairOptions,
)

__all__ = [
    "DEFAULT_AGENT_IMAGE",
    "DEFAULT_GATEWAY_IMAGE",
    "DEFAULT_NAME",
    "GATEWAY_CAPS",
    "LABEL_PAIR",
    "LABEL_ROLE",
    "NameHeld",
    "PairError",
    "PairHealth",
    "PairInfo",
    "PairNames",
    "PairOptions",
    "container_of",
    "down",
    "gateway_logs",
    "internal_podman_networks",
    "pair_health",
    "restart",
    "up",
    "wait_ready",
]
