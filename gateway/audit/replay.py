"""`keyward audit replay`: re-decide recorded requests under a candidate policy.

A policy change is gated the way a code change is: replay what agents really did against the
new rules and see what would change before it ships. Only what an audit record holds is used
(plane, method, scheme, host, port, path with query values redacted); nothing here sees a
secret. Records refused on facts the log does not keep (a Host that disagreed with the
destination, a placeholder on the wrong host, a private address, an unwritable audit log...)
cannot be re-decided and are counted as such, never guessed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.policy.core import Plane, Policy, RequestFacts
from gateway.reasons import Reason

# Denials the policy core reaches from a record's fields alone: these can be re-decided.
POLICY_DENY_REASONS = frozenset(
    {
        Reason.NO_RULE,
        Reason.WOULD_DENY,
        Reason.HOST_DENIED,
        Reason.PATH_DENIED,
        Reason.AMBIGUOUS_PATH,
        Reason.PLAIN_HTTP_CREDENTIALS,
        Reason.NON_HTTP_KILLED,
    }
)
# Connection-level records: decided before any HTTP was seen.
CONNECTION_METHODS = frozenset({"CONNECT", "TLS", "TCP"})
HTTP_PLANES = frozenset({Plane.MITM.value, Plane.HTTP.value, Plane.SERVICE.value})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one decision came to, in the terms a record keeps."""

    verdict: str
    rule: str | None
    injected: frozenset[tuple[str, str]] = frozenset()

    @property
    def allowed(self) -> bool:
        return self.verdict != "deny"


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # newly-denied | newly-allowed | injections-changed
    host: str
    port: int
    method: str
    path: str
    plane: str
    before: Outcome
    after: Outcome


@dataclass
class ReplayReport:
    replayed: int = 0
    unchanged: int = 0
    not_replayable: Counter[str] = field(default_factory=Counter)
    changes: list[Change] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def groups(self) -> list[dict[str, Any]]:
        """Changes grouped by host and (old rule -> new rule), biggest first."""
        buckets: dict[tuple[str, str | None, str | None], list[Change]] = defaultdict(list)
        for c in self.changes:
            buckets[(c.host, c.before.rule, c.after.rule)].append(c)
        out: list[dict[str, Any]] = []
        for (host, before, after), items in buckets.items():
            kinds = Counter(c.kind for c in items)
            added = sorted({i for c in items for i in c.after.injected - c.before.injected})
            removed = sorted({i for c in items for i in c.before.injected - c.after.injected})
            out.append(
                {
                    "host": host,
                    "rule_before": before,
                    "rule_after": after,
                    "requests": len(items),
                    "kinds": dict(sorted(kinds.items())),
                    "injections_added": [f"{s}@{loc}" for s, loc in added],
                    "injections_removed": [f"{s}@{loc}" for s, loc in removed],
                    "examples": sorted({f"{c.method} {c.path}" for c in items})[:5],
                }
            )
        out.sort(key=lambda g: (-int(g["requests"]), str(g["host"])))
        return out

    def as_dict(self) -> dict[str, Any]:
        kinds = Counter(c.kind for c in self.changes)
        return {
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "changed": len(self.changes),
            "newly_denied": kinds["newly-denied"],
            "newly_allowed": kinds["newly-allowed"],
            "injections_changed": kinds["injections-changed"],
            "not_replayable": dict(sorted(self.not_replayable.items())),
            "groups": self.groups(),
        }


def recorded_outcome(rec: Mapping[str, Any]) -> Outcome:
    injected = frozenset(
        (str(i.get("secret")), str(i.get("location")))
        for i in rec.get("injected") or ()
        if isinstance(i, Mapping) and not str(i.get("location", "")).startswith("placeholder:")
    )
    return Outcome(str(rec.get("decision")), rec.get("rule"), injected)


def _replayable(rec: Mapping[str, Any]) -> str | None:
    """None if the record can be re-decided, else why not (a short, stable word)."""
    plane = str(rec.get("plane") or "")
    method = str(rec.get("method") or "")
    if plane not in HTTP_PLANES and plane not in (Plane.PASSTHROUGH.value, Plane.DNS.value):
        return f"plane-{plane or 'unknown'}"
    if not rec.get("host") or not isinstance(rec.get("port"), int):
        return "incomplete-record"
    if method == "UDP":
        return "udp"
    if rec.get("decision") == "deny":
        reason = str(rec.get("reason") or "")
        kind = Reason.parse(reason)
        policy_dns = plane == Plane.DNS.value and kind is Reason.TYPE_REFUSED
        if not (kind in POLICY_DENY_REASONS or policy_dns):
            return reason.split(":", 1)[0] or "unknown-reason"
    return None


def decide_record(policy: Policy, rec: Mapping[str, Any]) -> Outcome:
    """The candidate policy's outcome for what `rec` describes."""
    plane = str(rec["plane"])
    method = str(rec.get("method") or "GET")
    host = str(rec["host"])
    if plane == Plane.DNS.value:
        named = policy.decide_name(host, method)
        return Outcome(named.verdict.value, named.rule)
    port = int(rec["port"])
    if plane == Plane.PASSTHROUGH.value or method in CONNECTION_METHODS:
        cd = policy.connection(host, port)
        verdict = cd.verdict.value
        if method == "TCP" and cd.allowed and not cd.tcp:
            verdict = "deny"
        return Outcome(verdict, cd.rule)
    facts = RequestFacts(
        plane=Plane(plane),
        method=method,
        scheme=str(rec.get("scheme") or "https"),
        host=host,
        port=port,
        path=str(rec.get("path") or "/"),
        client="replay",
    )
    d = policy.decide(facts)
    injected = frozenset(
        (i.secret, i.location) for i in d.injections if not i.location.startswith("placeholder:")
    )
    return Outcome(d.verdict.value, d.rule, injected)


def _kind(before: Outcome, after: Outcome) -> str | None:
    if before.allowed and not after.allowed:
        return "newly-denied"
    if not before.allowed and after.allowed:
        return "newly-allowed"
    if after.allowed and before.injected != after.injected:
        return "injections-changed"
    return None


def replay(policy: Policy, records: Iterable[Mapping[str, Any]]) -> ReplayReport:
    report = ReplayReport()
    for rec in records:
        why = _replayable(rec)
        if why is not None:
            report.not_replayable[why] += 1
            continue
        before = recorded_outcome(rec)
        after = decide_record(policy, rec)
        report.replayed += 1
        kind = _kind(before, after)
        if kind is None:
            report.unchanged += 1
            continue
        report.changes.append(
            Change(
                kind,
                str(rec["host"]),
                int(rec.get("port") or 0),
                str(rec.get("method") or ""),
                str(rec.get("path") or ""),
                str(rec["plane"]),
                before,
                after,
            )
        )
    return report
