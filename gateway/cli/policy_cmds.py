"""`keyward policy test METHOD URL`: one request through the policy core, no network.

Shows what the planes would do with it: the canonical path the rules matched (and, on hosts
with path rules, the target sent upstream), why a path is ambiguous, and every method the
request could mean (override headers, `_method` in the query or in a `-d` form body).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any
from urllib.parse import urlsplit

from gateway.cli.config_cmds import add_config_option, load_from_args
from gateway.config.compile import build_policy
from gateway.errors import UsageError
from gateway.policy.addresses import parse_ip
from gateway.policy.core import Decision, Plane, Policy, RequestFacts
from gateway.policy.hosts import DEFAULT_PORTS, normalise_host
from gateway.policy.methods import MethodSignals
from gateway.policy.paths import canonicalise
from gateway.reasons import Reason


def facts_from_url(
    method: str, url: str, headers: list[str], data: str | None = None
) -> RequestFacts:
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise UsageError(f"not an http(s)/ws(s) URL: {url!r}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as e:
        raise UsageError(f"bad port in {url!r}") from e
    pairs: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"bad header {h.split(':', 1)[0]!r}: expected 'Name: value'")
        pairs.append((name.strip(), value.strip()))
    host_header = next((v for k, v in pairs if k.lower() == "host"), None)
    # The target exactly as typed (urlsplit would drop a fragment and tabs): what the core sees.
    path = url.split("://", 1)[1][len(parts.netloc) :] or "/"
    body = None if data is None else data.encode()
    if body is not None and not any(k.lower() == "content-length" for k, _ in pairs):
        pairs.append(("Content-Length", str(len(body))))
    if body is not None and not any(k.lower() == "content-type" for k, _ in pairs):
        pairs.append(("Content-Type", "application/x-www-form-urlencoded"))  # as curl -d

    def get_all(name: str) -> list[str]:
        return [v for k, v in pairs if k.lower() == name]

    signals = dataclasses.replace(MethodSignals.from_headers(get_all), body=body)
    secure = parts.scheme in ("https", "wss")
    return RequestFacts(
        plane=Plane.MITM if secure else Plane.HTTP,
        method=method,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        path=path,
        sni=parts.hostname if secure else None,
        host_header=host_header,
        client="policy-test",
        headers=tuple(pairs),
        signals=signals,
    )


def parse_answers(entries: list[str]) -> dict[str, list[str]]:
    """`--resolve NAME=ADDR[,ADDR...]` as name -> addresses."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, addrs = entry.partition("=")
        try:
            key = normalise_host(name)
        except ValueError:
            key = ""
        parsed = [parse_ip(a.strip()) for a in addrs.split(",")]
        if not sep or not key or any(ip is None for ip in parsed):
            raise UsageError(f"bad --resolve {entry!r}: expected NAME=ADDR[,ADDR...]")
        out.setdefault(key, []).extend(a.strip() for a in addrs.split(","))
    return out


def decide_offline(policy: Policy, facts: RequestFacts) -> Decision:
    """Decide as a plane would; a form body it asks for is the one given with -d (or none)."""
    decision = policy.decide(
        dataclasses.replace(facts, signals=dataclasses.replace(facts.signals, body=None))
    )
    if decision.body_limit and facts.signals.body is not None:
        decision = policy.decide(facts)
    return decision


def describe(facts: RequestFacts, decision: Decision) -> dict[str, Any]:
    canon = canonicalise(facts.path)
    return {
        "decision": decision.verdict.value,
        "rule": decision.rule,
        "reason": decision.reason,
        "status": decision.status if not decision.allowed else None,
        "injected": [i.as_dict() for i in decision.injections],
        "path": facts.path,
        "canonical_path": canon.path,
        "ambiguities": [str(a) for a in canon.ambiguities],
        "methods": list(decision.methods),
        "upstream_target": decision.target,
    }


def cmd_policy_test(args: argparse.Namespace) -> int:
    loaded = load_from_args(args)
    policy = build_policy(loaded.config)
    facts = facts_from_url(args.method, args.url, args.header, args.data)
    answers = parse_answers(args.resolve)
    decision = decide_offline(policy, facts)
    result = describe(facts, decision)
    # The dial-time check: on the URL's IP literal, or on the resolver answer given (only
    # for an allowed request: its host is valid; a refused one may not be, e.g. bad-host).
    if decision.allowed:
        host = normalise_host(facts.host)
        addrs = [host] if parse_ip(host) is not None else answers.get(host, [])
        for addr in addrs:
            category = policy.address_refusal(host, facts.port, addr)
            if category is not None:
                result.update(
                    decision="deny",
                    reason=Reason.PRIVATE_ADDRESS,
                    status=403,
                    injected=[],
                    upstream_target=None,
                    address=f"{addr} ({category})",
                )
                break
    code = 1 if args.exit_code and result["decision"] == "deny" else 0
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return code
    injected = ", ".join(f"{i['secret']} -> {i['location']}" for i in result["injected"])
    status = f" (HTTP {result['status']})" if result["status"] else ""
    if result["upstream_target"]:
        upstream = result["upstream_target"]
    else:
        upstream = "- (refused)" if result["status"] else "- (as the client wrote it)"
    rows = [
        ("decision", f"{result['decision']}{status}"),
        ("rule", result["rule"] or "-"),
        ("reason", result["reason"]),
        ("injects", injected or "-"),
        ("path", f"{result['path']!r} -> {result['canonical_path']}"),
        ("ambiguous", ", ".join(result["ambiguities"]) or "no"),
        ("methods", ", ".join(result["methods"]) or "- (no path rules on this host)"),
        ("upstream", upstream),
    ]
    if "address" in result:
        rows.append(("address", result["address"]))
    for name, value in rows:
        print(f"{name + ':':<11}{value}")
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy", help="dry-run requests through the policy")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    t = psub.add_parser("test", help="decide one request: METHOD URL")
    add_config_option(t)
    t.add_argument("method")
    t.add_argument("url")
    t.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'Name: value'",
        help="a request header",
    )
    t.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="NAME=ADDR[,ADDR]",
        help="what NAME resolves to: apply the dial-time private-address check to it",
    )
    t.add_argument(
        "-d",
        "--data",
        metavar="BODY",
        help="a request body (form-encoded unless -H sets Content-Type): read for `_method`",
    )
    t.add_argument("--json", action="store_true", help="print the decision as JSON")
    t.add_argument(
        "--exit-code", action="store_true", help="exit 1 when the request would be denied (CI)"
    )
    t.set_defaults(func=cmd_policy_test)
