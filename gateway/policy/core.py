"""The sans-IO policy core: request facts in, decision out.

Nothing here performs I/O or sees a secret value. A `Decision` names secrets; only
`gateway.policy.apply.apply_plan`, given a resolver from the credential store, turns names into
values, and it refuses any decision that is not an allow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.policy.hosts import (
    HostMatcher,
    HostPattern,
    PatternKind,
    normalise_host,
    split_hostport,
)
from gateway.policy.paths import PathRule, normalise_path
from gateway.policy.templates import Template


class Plane(StrEnum):
    MITM = "mitm"
    PASSTHROUGH = "passthrough"
    HTTP = "http"
    SERVICE = "service"
    DNS = "dns"


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    WARN = "warn"


@dataclass(frozen=True, slots=True)
class HeaderWrite:
    """Set header `name` to `template`, or to HTTP basic auth of (`basic_user`, `template`)."""

    name: str
    template: Template
    basic_user: Template | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        user = self.basic_user.secrets if self.basic_user else ()
        return (*user, *self.template.secrets)

    @property
    def location(self) -> str:
        return "basic" if self.basic_user is not None else f"header:{self.name}"


@dataclass(frozen=True, slots=True)
class HostRule:
    pattern: HostPattern
    allow: bool = True
    headers: tuple[HeaderWrite, ...] = ()
    deny: tuple[PathRule, ...] = ()
    intercept: bool | None = None
    tcp: bool = False
    plain_http: bool = False
    dns_types: frozenset[str] = frozenset()

    @property
    def secrets(self) -> frozenset[str]:
        return frozenset(s for h in self.headers for s in h.secrets)

    @property
    def needs_interception(self) -> bool:
        if self.intercept is not None:
            return self.intercept
        return bool(self.headers or self.deny)


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A fake credential the agent may hold; swapped for `secret` on hosts that use it."""

    env: str
    secret: str
    value: str


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a data plane verified about one request. `host` is the verified destination."""

    plane: Plane
    method: str
    scheme: str
    host: str
    port: int
    path: str = "/"
    sni: str | None = None
    host_header: str | None = None
    client: str = ""
    addr: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Injection:
    secret: str
    location: str

    def as_dict(self) -> dict[str, str]:
        return {"secret": self.secret, "location": self.location}


@dataclass(frozen=True, slots=True)
class InjectionPlan:
    """What to write into an allowed request, by secret name only."""

    headers: tuple[HeaderWrite, ...] = ()
    swaps: tuple[Placeholder, ...] = ()
    # Derived once here: every allowed request reads them (audit record, token minting).
    injections: tuple[Injection, ...] = field(init=False, repr=False, compare=False)
    secrets: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out = [Injection(s, h.location) for h in self.headers for s in dict.fromkeys(h.secrets)]
        out.extend(Injection(p.secret, f"placeholder:{p.env}") for p in self.swaps)
        object.__setattr__(self, "injections", tuple(out))
        object.__setattr__(self, "secrets", frozenset(i.secret for i in out))


EMPTY_PLAN = InjectionPlan()


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    rule: str | None
    reason: str
    plan: InjectionPlan | None = None
    alert: bool = False
    normalised_path: str = "/"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.DENY

    @property
    def injections(self) -> tuple[Injection, ...]:
        return self.plan.injections if self.plan is not None else ()


@dataclass(frozen=True, slots=True)
class ConnectionDecision:
    """What to do with a connection before any HTTP is seen (CONNECT, TLS ClientHello, raw TCP)."""

    verdict: Verdict
    rule: str | None
    reason: str
    intercept: bool = True
    tcp: bool = False

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.DENY


DNS_ADDRESS_TYPES = frozenset({"A", "AAAA"})


class Policy:
    """Compiled egress policy. Build once per config; `decide` is safe to call from anywhere."""

    def __init__(
        self,
        rules: Iterable[HostRule],
        default: Verdict = Verdict.DENY,
        placeholders: Iterable[Placeholder] = (),
    ) -> None:
        self.rules: tuple[HostRule, ...] = tuple(rules)
        self.default = Verdict(default)
        self.matcher: HostMatcher[HostRule] = HostMatcher([(r.pattern, r) for r in self.rules])
        self._hostport_hosts = frozenset(
            r.pattern.host for r in self.rules if r.pattern.kind is PatternKind.HOSTPORT
        )
        self.placeholders: tuple[Placeholder, ...] = tuple(placeholders)
        self._by_value = {p.value: p for p in self.placeholders}
        self._placeholder_re = (
            re.compile(
                "|".join(re.escape(v) for v in sorted(self._by_value, key=len, reverse=True))
            )
            if self._by_value
            else None
        )

    # -- lookups --------------------------------------------------------------------------
    def rule_for(self, host: str, port: int, addr: str | None = None) -> HostRule | None:
        hit = self.matcher.match(host, port, addr)
        return hit[1] if hit is not None else None

    def placeholders_in(self, text: str) -> list[Placeholder]:
        if self._placeholder_re is None or not text:
            return []
        return [self._by_value[m.group(0)] for m in self._placeholder_re.finditer(text)]

    def _default(self, what: str) -> tuple[Verdict, str]:
        if self.default is Verdict.ALLOW:
            return Verdict.ALLOW, "default-allow"
        if self.default is Verdict.WARN:
            return Verdict.WARN, f"would-deny: {what}"
        return Verdict.DENY, what

    # -- decisions ------------------------------------------------------------------------
    def decide(self, facts: RequestFacts) -> Decision:
        try:
            host = normalise_host(facts.host)
        except ValueError:
            return Decision(Verdict.DENY, None, "bad-host")
        path = normalise_path(facts.path)
        if facts.host_header is not None and not _same_destination(
            facts.host_header, host, facts.port
        ):
            return Decision(Verdict.DENY, None, "host-mismatch", normalised_path=path)
        if facts.sni and not _same_host(facts.sni, host):
            return Decision(Verdict.DENY, None, "sni-mismatch", normalised_path=path)

        rule = self.rule_for(host, facts.port, facts.addr)
        rule_text = rule.pattern.text if rule is not None else None

        swaps: dict[str, Placeholder] = {}
        if self._placeholder_re is not None:
            # One scan over every header value (no placeholder contains a newline).
            seen = self.placeholders_in(facts.path)
            seen.extend(self.placeholders_in("\n".join(v for _, v in facts.headers)))
            secrets = rule.secrets if rule is not None and seen else frozenset()
            for ph in seen:
                if ph.secret not in secrets or (rule is not None and not rule.allow):
                    return Decision(
                        Verdict.DENY,
                        rule_text,
                        f"placeholder-wrong-host: {ph.env}",
                        alert=True,
                        normalised_path=path,
                    )
                swaps[ph.value] = ph

        if rule is None:
            verdict, reason = self._default("no-rule")
            plan = EMPTY_PLAN if verdict is not Verdict.DENY else None
            return Decision(verdict, None, reason, plan, normalised_path=path)
        if not rule.allow:
            return Decision(Verdict.DENY, rule_text, "host-denied", normalised_path=path)
        method = facts.method.upper()
        for pr in rule.deny:
            if pr.matches(method, path):
                return Decision(
                    Verdict.DENY, rule_text, f"path-denied: {pr.text}", normalised_path=path
                )
        plan = (
            InjectionPlan(rule.headers, tuple(swaps.values()))
            if rule.headers or swaps
            else EMPTY_PLAN
        )
        if (plan.headers or plan.swaps) and facts.scheme in ("http", "ws") and not rule.plain_http:
            return Decision(Verdict.DENY, rule_text, "plain-http-credentials", normalised_path=path)
        return Decision(Verdict.ALLOW, rule_text, "rule", plan, normalised_path=path)

    def connection(
        self, host: str, port: int, sni: str | None = None, addr: str | None = None
    ) -> ConnectionDecision:
        """Decide a connection by its verified destination before HTTP is seen."""
        try:
            h = normalise_host(host)
        except ValueError:
            return ConnectionDecision(Verdict.DENY, None, "bad-host")
        if sni and not _same_host(sni, h):
            return ConnectionDecision(Verdict.DENY, None, "sni-mismatch")
        rule = self.rule_for(h, port, addr)
        if rule is None:
            verdict, reason = self._default("no-rule")
            # With no rule, there is nothing to inject: intercept only to see placeholders.
            return ConnectionDecision(verdict, None, reason, intercept=bool(self.placeholders))
        if not rule.allow:
            return ConnectionDecision(Verdict.DENY, rule.pattern.text, "host-denied")
        intercept = rule.needs_interception or (bool(self.placeholders) and rule.intercept is None)
        return ConnectionDecision(
            Verdict.ALLOW, rule.pattern.text, "rule", intercept=intercept, tcp=rule.tcp
        )

    def name_allowed(self, name: str, qtype: str = "A") -> tuple[bool, str | None]:
        """Whether DNS may answer `name` for `qtype` (any port could be allowed)."""
        try:
            h = normalise_host(name)
        except ValueError:
            return False, None
        rule = self.rule_for(h, 0)
        if rule is None and h in self._hostport_hosts:
            rule = next(
                r
                for r in self.rules
                if r.pattern.kind is PatternKind.HOSTPORT and r.pattern.host == h
            )
        if rule is None:
            ok = self.default is not Verdict.DENY and qtype in DNS_ADDRESS_TYPES
            return ok, None
        if not rule.allow:
            return False, rule.pattern.text
        ok = qtype in DNS_ADDRESS_TYPES or qtype in rule.dns_types
        return ok, rule.pattern.text


def _same_host(name: str, host: str) -> bool:
    try:
        return normalise_host(name) == host
    except ValueError:
        return False


def _same_destination(host_header: str, host: str, port: int) -> bool:
    try:
        hh, hport = split_hostport(host_header.strip())
        if normalise_host(hh) != host:
            return False
    except ValueError:
        return False
    # A Host header without a port names the host only; clients omit default ports.
    return hport is None or hport == port
