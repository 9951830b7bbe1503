"""Large configs, for the load tests and `scripts/bench_config.py`."""

from __future__ import annotations


def big_config(n: int, *, plain: bool = False) -> str:
    """A config of `n` host rules in the shapes a large allow list has: exact hosts, wildcards,
    `host:port` rules injecting a credential, hosts with denied paths, denied addresses (one
    shape in five each). The credential is the secret `tok`, read from `$TOK`. `plain`: every
    rule an exact host allowed as is (`host: {}`), a plain allow list."""
    out = ["version: 1", "secrets:", "  tok: {env: TOK}", "egress:", "  hosts:"]
    for i in range(n):
        kind = 0 if plain else i % 5
        if kind == 0:
            out.append(f"    h{i}.example.test: {{}}")
        elif kind == 1:
            out.append(f'    "*.w{i}.example.test":')
        elif kind == 2:
            out.append(f"    h{i}.example.test:443:")
            out.append("      headers: {Authorization: 'Bearer {tok}'}")
        elif kind == 3:
            out.append(f"    h{i}.example.test:")
            out.append("      deny: ['POST /admin/**']")
        else:
            out.append(f"    10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}: {{allow: false}}")
    return "\n".join(out) + "\n"
