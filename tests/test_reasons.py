"""One reason enum: every reason keyward writes is a member, on the wire byte for byte what it
was, and `docs/audit.md` lists exactly the members."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from gateway.audit.writer import AuditRecord
from gateway.policy.core import HostRule, Plane, Policy, RequestFacts, Verdict
from gateway.policy.hosts import parse_pattern
from gateway.policy.paths import parse_path_rule
from gateway.policy.refusal import refusal
from gateway.reasons import DetailedReason, Reason, type_refused

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit.md"


def documented() -> list[str]:
    """The first code span of each row of the Reasons table in docs/audit.md."""
    section = DOC.read_text(encoding="utf-8").split("\n## Reasons\n", 1)[1]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_the_doc_lists_every_reason_once_and_nothing_else() -> None:
    rows = documented()
    kinds = [Reason.parse(r) for r in rows]
    assert None not in kinds, [r for r, k in zip(rows, kinds, strict=True) if k is None]
    assert len(kinds) == len(set(kinds)), "a reason is listed twice"
    assert set(kinds) == set(Reason)


def test_detailed_reasons_are_documented_with_their_detail() -> None:
    detailed = {Reason.parse(r) for r in documented() if ": " in r}
    assert detailed == {
        Reason.WOULD_DENY,
        Reason.PATH_DENIED,
        Reason.AMBIGUOUS_PATH,
        Reason.PLACEHOLDER_WRONG_HOST,
        Reason.CREDENTIALS_UNAVAILABLE,
    }


def test_wire_forms_are_plain_strings() -> None:
    path = Reason.PATH_DENIED.about("DELETE /repos/**")
    assert path == "path-denied: DELETE /repos/**"
    assert (path.kind, path.detail) == (Reason.PATH_DENIED, "DELETE /repos/**")
    assert json.dumps({"reason": path}) == '{"reason": "path-denied: DELETE /repos/**"}'
    assert json.dumps({"reason": Reason.NO_RULE}) == '{"reason": "no-rule"}'
    assert f"{Reason.NO_RULE}" == "no-rule" and Reason.NO_RULE.kind is Reason.NO_RULE
    txt = type_refused("TXT")
    assert txt == "txt-refused" and Reason.parse(txt) is Reason.TYPE_REFUSED
    assert pickle.loads(pickle.dumps(path)).kind is Reason.PATH_DENIED


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("no-rule", Reason.NO_RULE),
        ("would-deny: no-rule", Reason.WOULD_DENY),
        ("credentials-unavailable: TokenUnavailable", Reason.CREDENTIALS_UNAVAILABLE),
        ("type65280-refused", Reason.TYPE_REFUSED),
        ("class-refused", Reason.CLASS_REFUSED),
        ("not-a-reason", None),
        ("x y-refused", None),
        ("", None),
    ],
)
def test_parse(text: str, kind: Reason | None) -> None:
    assert Reason.parse(text) is kind


def _facts(method: str = "GET", path: str = "/", host: str = "api.example.test") -> RequestFacts:
    return RequestFacts(Plane.MITM, method, "https", host, 443, path)


def test_policy_decisions_carry_members() -> None:
    rules = [
        HostRule(parse_pattern("api.example.test"), deny=(parse_path_rule("DELETE /repos/**"),)),
        HostRule(parse_pattern("blocked.example.test"), allow=False),
    ]
    cases = {
        _facts(): Reason.RULE,
        _facts(host="nowhere.example.test"): Reason.NO_RULE,
        _facts(host="blocked.example.test"): Reason.HOST_DENIED,
        _facts("DELETE", "/repos/a"): Reason.PATH_DENIED,
        _facts(path="/a%2Fb"): Reason.AMBIGUOUS_PATH,
        _facts("G ET"): Reason.BAD_METHOD,
    }
    for default in Verdict:
        policy = Policy(rules, default=default)
        for facts, kind in cases.items():
            got = policy.decide(facts).reason
            assert isinstance(got, (Reason, DetailedReason)), got
            if kind is Reason.NO_RULE and default is not Verdict.DENY:
                kind = Reason.DEFAULT_ALLOW if default is Verdict.ALLOW else Reason.WOULD_DENY
            assert got.kind is kind, (facts, got)
    assert Policy(rules).decide_name("api.example.test", "TXT").reason == "txt-refused"


def test_header_body_and_audit_record_carry_the_same_text() -> None:
    policy = Policy([HostRule(parse_pattern("api.example.test"), deny=(parse_path_rule("* /x"),))])
    facts = _facts(path="/x")
    decision = policy.decide(facts)
    r = refusal(decision, facts, accept="application/json")
    assert dict(r.headers)["X-Keyward-Reason"] == "path-denied: * /x"
    assert json.loads(r.body)["reason"] == "path-denied: * /x"
    rec = AuditRecord(
        plane="mitm", method="GET", scheme="https", host="h", port=1, path="/", decision="deny"
    )
    rec.reason = decision.reason
    assert json.loads(json.dumps(rec.as_dict()))["reason"] == "path-denied: * /x"


def test_no_reason_literal_outside_the_enum() -> None:
    """A reason spelled as a string literal where the enum is meant: any member's value quoted
    in gateway/ other than in gateway/reasons.py (docstrings and comments aside)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "gateway"
    values = {m.value for m in Reason} - {"rule", "error", "malformed"}  # ordinary words too
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "reasons.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and (node.value in values or node.value.split(": ", 1)[0] in values)
            ):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)
