"""Turn a validated config into the policy core's plain objects."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config.loader import gc_paused
from gateway.config.model import Config, HostRuleConfig
from gateway.policy.core import HeaderWrite, HostRule, Placeholder, Policy, Verdict
from gateway.policy.hosts import normalise_host, parse_pattern, split_hostport
from gateway.policy.paths import parse_path_rule
from gateway.policy.templates import parse_template


def compile_rule(key: str, rule: HostRuleConfig) -> HostRule:
    writes = [HeaderWrite(name, parse_template(t)) for name, t in rule.headers.items()]
    if rule.basic is not None:
        writes.append(
            HeaderWrite(
                "Authorization",
                parse_template(rule.basic.password),
                basic_user=parse_template(rule.basic.username),
            )
        )
    # Shared empty values: a config may hold 200,000 rules.
    return HostRule(
        pattern=parse_pattern(key),
        allow=rule.allow,
        headers=tuple(writes) if writes else (),
        deny=tuple(map(parse_path_rule, rule.deny)) if rule.deny else (),
        ambiguous_paths_allowed=rule.ambiguous_paths == "allow",
        intercept=rule.intercept,
        tcp=rule.tcp,
        plain_http=rule.plain_http,
        dns_types=frozenset(rule.dns_types) if rule.dns_types else _NO_TYPES,
        private_addresses=rule.private_addresses == "allow",
    )


_NO_TYPES: frozenset[str] = frozenset()


def build_policy(config: Config, placeholders: Iterable[Placeholder] = ()) -> Policy:
    with gc_paused():  # see gc_paused: a rule per host, all kept
        rules = [compile_rule(k, r) for k, r in config.egress.hosts.items()]
        targets = parse_resolve(config.upstream.resolve)
        return Policy(rules, Verdict(config.egress.default), placeholders, operator_targets=targets)


def parse_resolve(entries: dict[str, str]) -> dict[tuple[str, int], tuple[str, int]]:
    """`upstream.resolve` as (host, port) -> (target host, target port)."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for key, target in entries.items():
        host, port = split_hostport(key)
        thost, tport = split_hostport(target)
        assert port is not None and tport is not None  # validated by the config model
        out[(normalise_host(host), port)] = (thost, tport)
    return out


def parse_nameservers(entries: list[str]) -> list[tuple[str, int]]:
    """`upstream.nameservers` as (ip, port) pairs."""
    out = []
    for text in entries:
        host, port = split_hostport(text)
        assert port is not None  # validated by the config model
        out.append((host, port))
    return out
