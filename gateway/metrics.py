"""Prometheus metrics for a gateway: counted where the audit record is written, so the two agree.

Every metric is fed from the same call that writes an audit record (`observe`), so a scrape and
the audit log tell one story. Label values are bounded and never sensitive: planes, verdicts,
reason *kinds* (the part before `:`, so no rule path or placeholder name), secret names, hosts
and status classes. Never a secret value, a path or a query.

Per-credential health: a secret whose upstream answers 401/403 `FAILING_AFTER` times in a row is
reported failing (`keyward_credential_failing`, `/credentials`) until one answer is not an auth
failure: a revoked key is noticed, not silently injected forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import exposition as _exposition
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = _exposition.CONTENT_TYPE_LATEST
FAILING_AFTER = 3
AUTH_FAILURES = frozenset({401, 403})
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def reason_kind(reason: str | None) -> str:
    """`path-denied: DELETE /repos/**` -> `path-denied`: bounded, and no path in a label."""
    if not reason:
        return ""
    return reason.split(":", 1)[0].strip()[:64]


def code_class(status: int | None) -> str:
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


class _CountedElsewhere(Collector):
    """A counter whose value lives in the object that counts it (the audit writer)."""

    def __init__(self, name: str, doc: str, value: Callable[[], int]) -> None:
        self.name, self.doc, self.value = name, doc, value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.value())


class Metrics:
    """One registry per gateway (not the process-global one: tests run several gateways).
    `audit_errors` reads the audit writer's count of failed writes."""

    def __init__(self, audit_errors: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "keyward_requests",
            "Requests and refused connections, one per audit record",
            ("plane", "decision", "reason"),
            registry=r,
        )
        self.injections = Counter(
            "keyward_injections",
            "Credentials written into allowed requests",
            ("secret", "host"),
            registry=r,
        )
        self.upstream_responses = Counter(
            "keyward_upstream_responses",
            "Upstream answers to requests that carried a credential, by status class",
            ("secret", "code_class"),
            registry=r,
        )
        self.duration = Histogram(
            "keyward_request_duration_seconds",
            "Time from a request's arrival to its audit record",
            ("plane",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.token_mints = Counter(
            "keyward_token_mints",
            "OAuth access token requests, by outcome",
            ("secret", "outcome"),
            registry=r,
        )
        self.dns_queries = Counter(
            "keyward_dns_queries", "DNS queries answered or refused", ("decision",), registry=r
        )
        r.register(
            _CountedElsewhere(
                "keyward_audit_errors", "Failed attempts to write audit records", audit_errors
            )
        )
        self.credential_failing = Gauge(
            "keyward_credential_failing",
            f"1 while a credential's upstream has answered 401/403 {FAILING_AFTER}+ times in a row",
            ("secret",),
            registry=r,
        )
        self._lock = threading.Lock()
        self._auth_streak: dict[str, int] = {}
        # Label children by metric and values: `labels()` validates and locks on every call,
        # and every request would look up the same few children again (values are bounded).
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(
        self,
        *,
        plane: str,
        decision: str,
        reason: str | None,
        host: str,
        status: int | None,
        duration_ms: float,
        injected: Iterable[Mapping[str, str]] = (),
    ) -> None:
        """Count one audit record (called right after it is written)."""
        self._child(self.requests, plane, decision, reason_kind(reason)).inc()
        if plane == "dns":
            self._child(self.dns_queries, decision).inc()
            return
        self._child(self.duration, plane).observe(max(duration_ms, 0.0) / 1000.0)
        secrets = list(dict.fromkeys(i.get("secret", "") for i in injected))
        for secret in secrets:
            self._child(self.injections, secret, host).inc()
            self._child(self.upstream_responses, secret, code_class(status)).inc()
            if status is not None:
                self._credential_answer(secret, status)

    def _credential_answer(self, secret: str, status: int) -> None:
        with self._lock:
            before = self._auth_streak.get(secret)
            streak = (before or 0) + 1 if status in AUTH_FAILURES else 0
            self._auth_streak[secret] = streak
            if before is None or (before >= FAILING_AFTER) != (streak >= FAILING_AFTER):
                failing = 1 if streak >= FAILING_AFTER else 0
                self._child(self.credential_failing, secret).set(failing)

    def token_mint(self, secret: str, outcome: str) -> None:
        self.token_mints.labels(secret, outcome).inc()

    def credentials(self) -> dict[str, Any]:
        """Per-credential health for `/credentials` and `keyward status`."""
        with self._lock:
            streaks = dict(self._auth_streak)
        return {
            name: {"failing": n >= FAILING_AFTER, "consecutive_auth_failures": n}
            for name, n in sorted(streaks.items())
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
