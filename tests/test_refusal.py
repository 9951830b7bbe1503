"""The refusal body (gateway.policy.refusal): what was refused, by which rule, and lines that,
added to keyward.yaml, allow exactly that. The attacks on it are in tests/conformance/."""

from __future__ import annotations

import json

import pytest
import yaml

from gateway.config.compile import build_policy
from gateway.config.model import Config
from gateway.policy.core import Decision, Plane, RequestFacts, Verdict
from gateway.policy.refusal import refusal

BASE = {
    "version": 1,
    "egress": {
        "default": "deny",
        "hosts": {
            "api.example.test": {"deny": ["DELETE /admin/**"]},
            "blocked.example.test": {"allow": False},
        },
    },
}


def _facts(host: str, method: str = "GET", path: str = "/p", port: int = 443) -> RequestFacts:
    return RequestFacts(Plane.MITM, method, "https", host, port, path)


def _apply_snippet(snippet: str) -> Config:
    """Merge the suggested lines into BASE the way an operator would."""
    merged = json.loads(json.dumps(BASE))
    merged["egress"]["hosts"].update(yaml.safe_load(snippet)["egress"]["hosts"])
    return Config.model_validate(merged)


@pytest.mark.parametrize(
    ("host", "port"),
    [("new.example.test", 443), ("blocked.example.test", 443), ("new.example.test", 8443)],
)
def test_suggested_lines_allow_exactly_what_was_refused(host: str, port: int) -> None:
    policy = build_policy(Config.model_validate(BASE), ())
    facts = _facts(host, port=port)
    decision = policy.decide(facts)
    assert not decision.allowed
    body = json.loads(refusal(decision, facts, accept="application/json").body)
    assert body["config"], body
    after = build_policy(_apply_snippet(body["config"]), ())
    assert after.decide(facts).allowed


def test_plain_paragraph_names_what_why_and_lines() -> None:
    policy = build_policy(Config.model_validate(BASE), ())
    facts = _facts("new.example.test", "POST", "/v1/x?token=SECRETQUERY")
    r = refusal(policy.decide(facts), facts)
    text = r.body.decode()
    assert r.status == 403 and r.content_type.startswith("text/plain")
    paragraph, _, lines = text.partition("\n\n")
    assert "\n" not in paragraph.strip()  # one paragraph
    for part in ("host new.example.test", "port 443", "method POST", "path /v1/x"):
        assert part in paragraph
    assert "egress.default: deny" in paragraph
    assert lines == "egress:\n  hosts:\n    new.example.test: {}\n"
    assert "SECRETQUERY" not in text  # the query may carry a token
    assert dict(r.headers)["X-Keyward-Reason"] == "no-rule"


def test_path_denial_names_the_entry_and_rule() -> None:
    policy = build_policy(Config.model_validate(BASE), ())
    facts = _facts("api.example.test", "DELETE", "/admin/users")
    body = json.loads(refusal(policy.decide(facts), facts, accept="application/json").body)
    assert body["rule"] == "api.example.test" and body["decided_by"] == "api.example.test"
    assert "DELETE /admin/**" in body["explanation"]
    assert body["refused"] == {
        "method": "DELETE",
        "scheme": "https",
        "host": "api.example.test",
        "port": 443,
        "path": "/admin/users",
    }


def test_reset_mode_keeps_the_short_body() -> None:
    d = Decision(Verdict.DENY, None, "no-rule")
    r = refusal(d, _facts("x.example.test"), mode="reset")
    assert json.loads(r.body) == {"error": "denied by keyward", "reason": "no-rule", "rule": None}
