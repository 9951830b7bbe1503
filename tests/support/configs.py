"""Large configs, for the load tests and the benchmarks (`scripts/bench.py`'s filler rules,
`scripts/bench_config.py`)."""

from __future__ import annotations


def host_rule(i: int, kind: str) -> list[str]:
    """The YAML lines (under `egress.hosts:`) of rule number `i`, of one kind:
    `host` (exact, allowed as is), `wildcard`, `port` (`host:8443`), `inject` (`host:443`
    injecting the secret `tok`), `deny-path`, `deny-address` (an IPv4 address, denied),
    `network` (an IPv4 /32 CIDR)."""
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    return {
        "host": [f"    h{i}.example.test: {{}}"],
        "wildcard": [f'    "*.w{i}.example.test":'],
        "port": [f'    "p{i}.example.test:8443": {{}}'],
        "inject": [f"    h{i}.example.test:443:", "      headers: {Authorization: 'Bearer {tok}'}"],
        "deny-path": [f"    h{i}.example.test:", "      deny: ['POST /admin/**']"],
        "deny-address": [f"    {ip}: {{allow: false}}"],
        "network": [f'    "{ip}/32": {{}}'],
    }[kind]


def host_rules(n: int, kinds: tuple[str, ...]) -> str:
    """`n` rules, their kinds taken from `kinds` in turn."""
    return "\n".join(line for i in range(n) for line in host_rule(i, kinds[i % len(kinds)]))


MIXED = ("host", "wildcard", "inject", "deny-path", "deny-address")


def big_config(n: int, *, plain: bool = False) -> str:
    """A config of `n` host rules in the shapes a large allow list has (MIXED: exact hosts,
    wildcards, `host:443` rules injecting a credential, hosts with denied paths, denied
    addresses, one in five each; the credential is the secret `tok`, read from `$TOK`).
    `plain`: every rule an exact host allowed as is (`host: {}`), a plain allow list."""
    head = "version: 1\nsecrets:\n  tok: {env: TOK}\negress:\n  hosts:\n"
    return head + host_rules(n, ("host",) if plain else MIXED) + "\n"
