"""`keyward policy test METHOD URL`: one request through the policy core, no network."""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import urlsplit

from gateway.cli.config_cmds import add_config_option, load_from_args
from gateway.cli.errors import UsageError
from gateway.config.compile import build_policy
from gateway.policy.addresses import REASON, parse_ip
from gateway.policy.core import Plane, RequestFacts
from gateway.policy.hosts import DEFAULT_PORTS, normalise_host


def facts_from_url(method: str, url: str, headers: list[str]) -> RequestFacts:
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
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    secure = parts.scheme in ("https", "wss")
    return RequestFacts(
        plane=Plane.MITM if secure else Plane.HTTP,
        method=method.upper(),
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        path=path,
        sni=parts.hostname if secure else None,
        host_header=host_header,
        client="policy-test",
        headers=tuple(pairs),
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


def cmd_policy_test(args: argparse.Namespace) -> int:
    loaded = load_from_args(args)
    policy = build_policy(loaded.config)
    facts = facts_from_url(args.method, args.url, args.header)
    answers = parse_answers(args.resolve)
    decision = policy.decide(facts)
    result: dict[str, object] = {
        "decision": decision.verdict.value,
        "rule": decision.rule,
        "reason": decision.reason,
        "injected": [i.as_dict() for i in decision.injections],
    }
    # The dial-time check: on the URL's IP literal, or on the resolver answer given.
    host = normalise_host(facts.host)
    addrs = [host] if parse_ip(host) is not None else answers.get(host, [])
    if decision.allowed:
        for addr in addrs:
            category = policy.address_refusal(host, facts.port, addr)
            if category is not None:
                result.update(
                    decision="deny", reason=REASON, injected=[], address=f"{addr} ({category})"
                )
                break
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"decision: {result['decision']}")
        print(f"rule:     {result['rule'] or '-'}")
        print(f"reason:   {result['reason']}")
        injected = ", ".join(f"{i['secret']} -> {i['location']}" for i in result["injected"])
        print(f"injects:  {injected or '-'}")
        if "address" in result:
            print(f"address:  {result['address']}")
    return 1 if args.exit_code and result["decision"] == "deny" else 0


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
    t.add_argument("--json", action="store_true", help="print the decision as JSON")
    t.add_argument(
        "--exit-code", action="store_true", help="exit 1 when the request would be denied (CI)"
    )
    t.set_defaults(func=cmd_policy_test)
