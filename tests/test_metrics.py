"""Prometheus metrics of a real pod: scraped from outside like Prometheus does, equal to the
audit log, never reachable from the agent, never carrying a secret or a path."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, reason_kind
from tests.support.wait import BOUND
from tests.test_pod import REAL_KEY, PodWorld, curl
from tests.test_pod import world as world

pytestmark = pytest.mark.root

# Run by the agent: a bounded burst of concurrent requests, allowed, denied and failing.
LOAD = """
import concurrent.futures as cf, urllib.request as u, urllib.error as e
URLS = ["https://api.example.test/v1/x", "https://other.example.test/y",
        "http://plain.example.test/p", "https://api.example.test/status/500"]
def go(i):
    try:
        u.urlopen(URLS[i % len(URLS)], timeout=20).read()
    except e.HTTPError as err:
        err.read()
    except OSError:
        pass
with cf.ThreadPoolExecutor(8) as pool:
    list(pool.map(go, range(200)))
"""


def scrape(world: PodWorld, path: str = "/metrics") -> str:
    """From the upstream namespace, the way Prometheus (or a kubelet probe) reaches a pod."""
    url = f"http://{world.topo.addr.pod4}:{world.pod.ports.control}{path}"
    r = world.topo.upstream.run(["curl", "-sS", "--fail", "--max-time", "10", url])
    assert r.returncode == 0, r.stderr
    return r.stdout


def request_counts(text: str) -> collections.Counter[tuple[str, str]]:
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "keyward_requests":
            for s in family.samples:
                if s.name == "keyward_requests_total":
                    out[(s.labels["plane"], s.labels["decision"])] += int(s.value)
    return out


def audit_counts(world: PodWorld) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((str(r["plane"]), str(r["decision"])) for r in world.audit())


def settled(world: PodWorld) -> tuple[collections.Counter[tuple[str, str]], str]:
    """Metrics and audit read at one quiet moment (the last records land as clients exit)."""
    last: collections.Counter[tuple[str, str]] | None = None
    deadline = time.monotonic() + BOUND  # a bound on never settling; the caller shows the diff
    while True:
        text = scrape(world)
        now = request_counts(text)
        if (now == last and now == audit_counts(world)) or time.monotonic() > deadline:
            return now, text
        last = now
        time.sleep(0.1)


@pytest.mark.slow
def test_metrics_equal_the_audit_log_after_a_load_run(world: PodWorld) -> None:
    # the system Python: the test runner's may live where the agent uid cannot read
    r = world.agent("/usr/bin/python3", "-c", LOAD, timeout=300)
    assert r.returncode == 0, r.stderr
    counts, text = settled(world)
    assert counts == audit_counts(world)
    assert counts[("mitm", "allow")] >= 150 and counts[("dns", "allow")] > 0
    assert REAL_KEY not in text and "/v1/x" not in text and "/status" not in text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "keyward_requests",
        "keyward_injections",
        "keyward_upstream_responses",
        "keyward_request_duration_seconds",
        "keyward_dns_queries",
        "keyward_audit_errors",
        "keyward_token_mints",
        "keyward_credential_failing",
    } <= families
    responses = {
        (s.labels["secret"], s.labels["code_class"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "keyward_upstream_responses"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert responses[("key", "5xx")] == 50 and responses[("key", "2xx")] >= 100


def test_a_credential_answered_401_repeatedly_is_reported_failing(world: PodWorld) -> None:
    for _ in range(3):
        curl(world, "https://api.example.test/status/401")
    health = json.loads(scrape(world, "/credentials"))
    assert health["key"]["failing"] is True and health["key"]["consecutive_auth_failures"] >= 3
    assert 'keyward_credential_failing{secret="key"} 1.0' in scrape(world)
    curl(world, "https://api.example.test/v1/ok")  # the key works again
    assert json.loads(scrape(world, "/credentials"))["key"]["failing"] is False
    assert 'keyward_credential_failing{secret="key"} 0.0' in scrape(world)


@pytest.mark.parametrize("where", ["127.0.0.1", "pod-address"])
def test_agent_cannot_reach_the_metrics_port(world: PodWorld, where: str) -> None:
    host = world.topo.addr.pod4 if where == "pod-address" else where
    r = world.agent(
        "curl", "-sS", "--max-time", "5", f"http://{host}:{world.pod.ports.control}/metrics"
    )
    assert r.returncode != 0 and "keyward_requests" not in r.stdout
    assert scrape(world, "/healthz")  # while it answers from outside the pod


def test_metric_labels_are_bounded_and_free_of_paths(tmp_path: Path) -> None:
    m = Metrics()
    m.observe(
        plane="mitm",
        decision="deny",
        reason="path-denied: DELETE /repos/secret-project/**",
        host="api.github.com",
        status=403,
        duration_ms=1.5,
    )
    text = m.exposition().decode()
    assert "secret-project" not in text and 'reason="path-denied"' in text
    assert reason_kind("placeholder-wrong-host: OPENAI_API_KEY") == "placeholder-wrong-host"


def test_audit_write_errors_are_counted() -> None:
    errors = [0]
    m = Metrics(audit_errors=lambda: errors[0])
    assert "keyward_audit_errors_total 0.0" in m.exposition().decode()
    errors[0] = 3
    assert "keyward_audit_errors_total 3.0" in m.exposition().decode()
