"""The sans-IO policy core: request facts in, decision out.

Nothing here performs I/O or sees a secret value. A `Decision` names secrets; only
`gateway.policy.apply.apply_plan`, given a resolver from the credential store, turns names into
values, and it refuses any decision that is not an allow.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, NamedTuple, get_args

from gateway.policy.addresses import address_class, parse_ip
from gateway.policy.hosts import (
    HostMatcher,
    HostPattern,
    PatternKind,
    normalise_host,
    split_hostport,
)
from gateway.policy.methods import (
    FORM_BODY_LIMIT,
    NO_SIGNALS,
    MethodSignals,
    form_kind,
    form_overrides,
    is_token,
    meanings,
    query_overrides,
)
from gateway.policy.paths import CanonicalTarget, PathRule, canonicalise, is_malformed_target
from gateway.policy.templates import Template
from gateway.reasons import AnyReason, Reason, type_refused


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


class HostRule(NamedTuple):
    """A compiled `egress.hosts` rule. Immutable; a named tuple, not a frozen dataclass, since
    a large config compiles 200,000 of them and this is built in a third of the time."""

    pattern: HostPattern
    allow: bool = True
    headers: tuple[HeaderWrite, ...] = ()
    deny: tuple[PathRule, ...] = ()
    ambiguous_paths_allowed: bool = False
    intercept: bool | None = None
    tcp: bool = False
    plain_http: bool = False
    dns_types: frozenset[str] = frozenset()
    private_addresses: bool = False

    def names_address(self, addr: str, category: str) -> bool:
        """Whether this rule itself names `addr`: an IP/CIDR rule containing it, an IP literal
        rule equal to it, or a `localhost` rule for a loopback address."""
        ip = parse_ip(addr, unmap=True)
        if ip is None:
            return False
        p = self.pattern
        if p.network is not None:
            return ip.version == p.network.version and ip in p.network
        if p.host == "localhost" or p.host.endswith(".localhost"):
            return category == "loopback"
        return parse_ip(p.host, unmap=True) == ip

    @property
    def secrets(self) -> frozenset[str]:
        return frozenset(s for h in self.headers for s in h.secrets)

    @property
    def needs_interception(self) -> bool:
        if self.intercept is not None:
            return self.intercept
        return bool(self.headers or self.deny)


# Where a placeholder may be swapped for its real value. Anywhere else it passes unchanged and
# the request is audited as an alert: a real key in a body or a WebSocket message becomes
# content the provider stores and may later show back (or to someone else).
SwapLocation = Literal["header", "basic", "query", "body", "websocket"]
SWAP_LOCATIONS: tuple[SwapLocation, ...] = get_args(SwapLocation)
DEFAULT_SWAP_IN: frozenset[SwapLocation] = frozenset({"header", "basic"})


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A fake credential the agent may hold; swapped for `secret` on hosts that use it, only
    in the locations named by `swap_in`."""

    env: str
    secret: str
    value: str
    swap_in: frozenset[str] = DEFAULT_SWAP_IN


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
    # Override headers, form framing and (once asked for) the form body; filled by the planes
    # when `Policy.reads_methods`, so requests to hosts without path rules copy nothing.
    signals: MethodSignals = NO_SIGNALS


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
    # Placeholders seen in the request head where they may be swapped (header, basic, query).
    swaps: tuple[Placeholder, ...] = ()
    # Placeholders of this rule's secrets that may be swapped in the body or WebSocket messages.
    content_swaps: tuple[Placeholder, ...] = ()
    # Derived once here: every allowed request reads them (audit record, token minting).
    injections: tuple[Injection, ...] = field(init=False, repr=False, compare=False)
    secrets: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out = [Injection(s, h.location) for h in self.headers for s in dict.fromkeys(h.secrets)]
        out.extend(Injection(p.secret, f"placeholder:{p.env}") for p in self.swaps)
        object.__setattr__(self, "injections", tuple(out))
        object.__setattr__(self, "secrets", frozenset(i.secret for i in out))

    @property
    def credentialed(self) -> bool:
        """Whether a real value may be written into the request."""
        return bool(self.headers or self.swaps or self.content_swaps)

    def swappable(self, location: str) -> tuple[Placeholder, ...]:
        pool = self.content_swaps if location in ("body", "websocket") else self.swaps
        return tuple(p for p in pool if location in p.swap_in)


EMPTY_PLAN = InjectionPlan()


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    rule: str | None
    reason: AnyReason
    plan: InjectionPlan | None = None
    alert: bool = False
    normalised_path: str = "/"
    extra: dict[str, str] = field(default_factory=dict)
    status: int = 403  # what a refusal answers: an HTTP status (a DNS rcode for a name)
    # Where the rule has path rules: the canonical path + the query as sent. The planes send
    # exactly this, so the upstream never acts on another path than the one matched.
    target: str | None = None
    methods: tuple[str, ...] = ()  # every method the request could mean (path-rule hosts)
    # > 0: not decided yet. Read the form body (it is at most this long), put it in
    # `RequestFacts.signals.body` and decide again. The verdict meanwhile is DENY (fail closed).
    body_limit: int = 0

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
    reason: AnyReason
    intercept: bool = True
    tcp: bool = False

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.DENY


@dataclass(frozen=True, slots=True)
class _RuleUse:
    """What an allowed request on a rule needs that depends on the rule alone, derived once per
    rule (`Policy._use`) instead of on every request."""

    rule: HostRule
    secrets: frozenset[str]
    content: tuple[Placeholder, ...]  # its placeholders swappable in bodies or messages
    plan: InjectionPlan  # the plan when no placeholder is swapped in the head


DNS_ADDRESS_TYPES = frozenset({"A", "AAAA"})
# Not record types a stub resolver may ask for, whatever a rule's `dns_types` says.
DNS_META_TYPES = frozenset({"OPT", "AXFR", "IXFR", "TKEY", "TSIG", "MAILA", "MAILB"})
# What `decide_name` refusals answer (RFC 1035 §4.1.1 response codes).
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5


class Policy:
    """Compiled egress policy. Build once per config; `decide` is safe to call from anywhere."""

    def __init__(
        self,
        rules: Iterable[HostRule],
        default: Verdict = Verdict.DENY,
        placeholders: Iterable[Placeholder] = (),
        operator_targets: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.rules: tuple[HostRule, ...] = tuple(rules)
        # (host, port) keys of `upstream.resolve`: the operator chose where these are dialled.
        self.operator_targets = frozenset(operator_targets)
        self._operator_names = frozenset(h for h, _ in self.operator_targets)
        self.default = Verdict(default)
        self.matcher: HostMatcher[HostRule] = HostMatcher([(r.pattern, r) for r in self.rules])
        # Whether any rule has path rules: only then do the planes collect `MethodSignals`.
        self.reads_methods = any(r.deny for r in self.rules)
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
        self._uses: dict[int, _RuleUse] = {}  # by id() of a rule of `self.rules`

    def _use(self, rule: HostRule) -> _RuleUse:
        """The rule's per-rule derivations, computed on its first request."""
        use = self._uses.get(id(rule))
        if use is not None and use.rule is rule:
            return use
        secrets = rule.secrets
        content = tuple(
            p
            for p in self.placeholders
            if p.secret in secrets and p.swap_in & {"body", "websocket"}
        )
        plan = InjectionPlan(rule.headers, (), content) if rule.headers or content else EMPTY_PLAN
        use = self._uses[id(rule)] = _RuleUse(rule, secrets, content, plan)
        return use

    # -- lookups --------------------------------------------------------------------------
    def rule_for(self, host: str, port: int, addr: str | None = None) -> HostRule | None:
        hit = self.matcher.match(host, port, addr)
        return hit[1] if hit is not None else None

    def placeholders_in(self, text: str) -> list[Placeholder]:
        if self._placeholder_re is None or not text:
            return []
        return [self._by_value[m.group(0)] for m in self._placeholder_re.finditer(text)]

    def _default(self, what: Reason) -> tuple[Verdict, AnyReason]:
        if self.default is Verdict.ALLOW:
            return Verdict.ALLOW, Reason.DEFAULT_ALLOW
        if self.default is Verdict.WARN:
            return Verdict.WARN, Reason.WOULD_DENY.about(what)
        return Verdict.DENY, what

    # -- decisions ------------------------------------------------------------------------
    def decide(self, facts: RequestFacts) -> Decision:
        try:
            host = normalise_host(facts.host)
        except ValueError:
            return Decision(Verdict.DENY, None, Reason.BAD_HOST)
        canon = canonicalise(facts.path)
        path = canon.path
        if not is_token(facts.method):
            return Decision(Verdict.DENY, None, Reason.BAD_METHOD, status=400, normalised_path=path)
        if is_malformed_target(facts.path):
            return Decision(Verdict.DENY, None, Reason.BAD_TARGET, status=400, normalised_path=path)
        if facts.host_header is not None and not _same_destination(
            facts.host_header, host, facts.port
        ):
            return Decision(Verdict.DENY, None, Reason.HOST_MISMATCH, normalised_path=path)
        if facts.sni and not _same_host(facts.sni, host):
            return Decision(Verdict.DENY, None, Reason.SNI_MISMATCH, normalised_path=path)

        rule = self.rule_for(host, facts.port, facts.addr)
        rule_text = rule.pattern.text if rule is not None else None

        swaps: dict[str, Placeholder] = {}
        unswapped: list[str] = []
        if self._placeholder_re is not None:
            seen = self._placeholders_seen(facts)
            secrets = self._use(rule).secrets if rule is not None and seen else frozenset()
            for ph, location in seen:
                if ph.secret not in secrets or (rule is not None and not rule.allow):
                    return Decision(
                        Verdict.DENY,
                        rule_text,
                        Reason.PLACEHOLDER_WRONG_HOST.about(ph.env),
                        alert=True,
                        normalised_path=path,
                    )
                if location in ph.swap_in:
                    swaps[ph.value] = ph
                else:
                    unswapped.append(f"{ph.env} in {location}")

        if rule is None:
            verdict, reason = self._default(Reason.NO_RULE)
            plan = EMPTY_PLAN if verdict is not Verdict.DENY else None
            return Decision(verdict, None, reason, plan, normalised_path=path)
        if not rule.allow:
            return Decision(Verdict.DENY, rule_text, Reason.HOST_DENIED, normalised_path=path)
        target: str | None = None
        methods: tuple[str, ...] = ()
        if rule.deny:
            checked = _check_path_rules(rule, facts, canon)
            if isinstance(checked, Decision):
                return checked
            target, methods = canon.target, checked
        use = self._use(rule)
        plan = use.plan
        if swaps:
            plan = InjectionPlan(rule.headers, tuple(swaps.values()), use.content)
        if plan.credentialed and facts.scheme in ("http", "ws") and not rule.plain_http:
            return Decision(
                Verdict.DENY, rule_text, Reason.PLAIN_HTTP_CREDENTIALS, normalised_path=path
            )
        alert, extra = False, {}
        if unswapped:
            alert, extra = True, {"placeholder-not-swapped": ", ".join(unswapped)}
        return Decision(
            Verdict.ALLOW,
            rule_text,
            Reason.RULE,
            plan,
            alert=alert,
            normalised_path=path,
            extra=extra,
            target=target,
            methods=methods,
        )

    def _placeholders_seen(self, facts: RequestFacts) -> list[tuple[Placeholder, str]]:
        """Each placeholder in the request head and where: path, query, header, or basic (inside
        an `Authorization: Basic` blob). Header values are scanned in one pass (no placeholder
        contains a newline)."""
        target, _, query = facts.path.partition("?")
        seen = [(p, "path") for p in self.placeholders_in(target)]
        seen += [(p, "query") for p in self.placeholders_in(query)]
        seen += [
            (p, "header") for p in self.placeholders_in("\n".join(v for _, v in facts.headers))
        ]
        for name, value in facts.headers:
            if name.lower() == "authorization":
                decoded = basic_credentials(value)
                if decoded is not None:
                    seen += [(p, "basic") for p in self.placeholders_in(decoded)]
        return seen

    def connection(
        self, host: str, port: int, sni: str | None = None, addr: str | None = None
    ) -> ConnectionDecision:
        """Decide a connection by its verified destination before HTTP is seen."""
        try:
            h = normalise_host(host)
        except ValueError:
            return ConnectionDecision(Verdict.DENY, None, Reason.BAD_HOST)
        if sni and not _same_host(sni, h):
            return ConnectionDecision(Verdict.DENY, None, Reason.SNI_MISMATCH)
        rule = self.rule_for(h, port, addr)
        if rule is None:
            verdict, reason = self._default(Reason.NO_RULE)
            # With no rule, there is nothing to inject: intercept only to see placeholders.
            return ConnectionDecision(verdict, None, reason, intercept=bool(self.placeholders))
        if not rule.allow:
            return ConnectionDecision(Verdict.DENY, rule.pattern.text, Reason.HOST_DENIED)
        intercept = rule.needs_interception or (bool(self.placeholders) and rule.intercept is None)
        return ConnectionDecision(
            Verdict.ALLOW, rule.pattern.text, Reason.RULE, intercept=intercept, tcp=rule.tcp
        )

    def _name_rules(self, h: str) -> list[HostRule]:
        """The rules that could apply to name `h` on some port (DNS knows no port)."""
        rule = self.rule_for(h, 0)
        if rule is not None:
            return [rule]
        if h in self._hostport_hosts:
            return [
                r
                for r in self.rules
                if r.pattern.kind is PatternKind.HOSTPORT and r.pattern.host == h
            ]
        return []

    def address_refusal(self, host: str, port: int, addr: str) -> str | None:
        """Why the verified `host`:`port` may not be dialled at `addr`, or None if it may.

        `addr` is the address about to be connected (a resolver answer, or the original
        destination). A special address (see `gateway.policy.addresses`) is refused unless the
        operator mapped this host there (`upstream.resolve`), the matching rule names the
        address or says `private_addresses: allow`, or an allowing IP/CIDR rule contains it.
        `port` 0 asks for any port (the DNS listener).
        """
        category = address_class(addr)
        if category is None:
            return None
        try:
            h = normalise_host(host)
        except ValueError:
            return category
        if (h, port) in self.operator_targets or (port == 0 and h in self._operator_names):
            return None
        rules = self._name_rules(h) if port == 0 else [self.rule_for(h, port, addr)]
        for rule in rules:
            if (
                rule is not None
                and rule.allow
                and (rule.private_addresses or rule.names_address(addr, category))
            ):
                return None
        ip = parse_ip(addr, unmap=True)
        hit = self.matcher.match_address(ip) if ip is not None else None
        if hit is not None and hit[1].allow and hit[1].names_address(addr, category):
            return None
        return category

    def decide_name(self, name: str, qtype: str = "A") -> Decision:
        """Whether the DNS listener may answer `name` for record type `qtype` (DNS knows no
        port: a name is answerable if some port of it could be allowed).

        A refusal's `status` is the DNS rcode to answer: NXDOMAIN when the name itself is not
        allowed (so a client learns nothing about it), REFUSED when only the record type is.
        Types other than A/AAAA carry data (TXT, NULL, MX: LESSONS "DNS exfiltration") and are
        answered only where a rule's `dns_types` names them; meta types never.
        """
        try:
            h = normalise_host(name)
        except ValueError:
            return Decision(Verdict.DENY, None, Reason.BAD_NAME, status=RCODE_NXDOMAIN)
        rules = self._name_rules(h)
        rule = rules[0] if rules else None
        if rule is None:
            verdict, reason = self._default(Reason.NO_RULE)
            extra_types: frozenset[str] = frozenset()
        elif not rule.allow:
            verdict, reason = Verdict.DENY, Reason.HOST_DENIED
        else:
            verdict, reason = Verdict.ALLOW, Reason.RULE
            extra_types = rule.dns_types
        rule_text = rule.pattern.text if rule is not None else None
        if verdict is Verdict.DENY:
            return Decision(verdict, rule_text, reason, status=RCODE_NXDOMAIN)
        qtype = qtype.upper()
        if qtype in DNS_META_TYPES or not (qtype in DNS_ADDRESS_TYPES or qtype in extra_types):
            return Decision(Verdict.DENY, rule_text, type_refused(qtype), status=RCODE_REFUSED)
        return Decision(verdict, rule_text, reason, EMPTY_PLAN)


def basic_credentials(value: str) -> str | None:
    """The decoded `user:password` of an `Authorization: Basic` value, or None."""
    scheme, _, blob = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(blob.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _check_path_rules(
    rule: HostRule, facts: RequestFacts, canon: CanonicalTarget
) -> Decision | tuple[str, ...]:
    """A refusal, or every method the request could mean (none of them denied here)."""
    rule_text = rule.pattern.text

    def refuse(
        reason: AnyReason, status: int = 403, methods: tuple[str, ...] = (), limit: int = 0
    ) -> Decision:
        return Decision(
            Verdict.DENY,
            rule_text,
            reason,
            normalised_path=canon.path,
            status=status,
            methods=methods,
            body_limit=limit,
        )

    signals = facts.signals
    methods = meanings(facts.method, (*signals.overrides, *query_overrides(canon.query)))
    if canon.ambiguities and not rule.ambiguous_paths_allowed:
        return refuse(Reason.AMBIGUOUS_PATH.about(",".join(canon.ambiguities)), 400, methods)
    hits = [pr for pr in rule.deny if pr.matches_path(canon.path)]
    for pr in hits:
        if pr.method == "*" or pr.method in methods:
            return refuse(Reason.PATH_DENIED.about(pr.text), methods=methods)
    if not hits or form_kind(signals.content_type) is None:
        return methods
    # A form body could name another method (`_method`) for a path with rules: read it first,
    # bounded, and only in this case; everything else keeps streaming.
    body = signals.body
    if body is None:
        if signals.content_encoding.strip().lower() not in ("", "identity"):
            return refuse(Reason.FORM_BODY_ENCODED, 415, methods)
        if signals.content_length is None:
            return refuse(Reason.FORM_LENGTH_REQUIRED, 411, methods)
        if signals.content_length > FORM_BODY_LIMIT:
            return refuse(Reason.FORM_TOO_LARGE, 413, methods)
        if signals.content_length:
            return refuse(Reason.FORM_BODY_PENDING, 403, methods, limit=signals.content_length)
        body = b""
    found = form_overrides(signals.content_type, body)
    if found is None:
        return refuse(Reason.AMBIGUOUS_FORM, 400, methods)
    methods = meanings(facts.method, (*methods, *found))
    for pr in hits:
        if pr.method in methods:
            return refuse(Reason.PATH_DENIED.about(pr.text), methods=methods)
    return methods


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
