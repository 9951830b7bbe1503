"""`keyward policy test METHOD URL`: one request through the policy core, no network."""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import urlsplit

from gateway.cli.config_cmds import add_config_option, load_from_args
from gateway.cli.errors import UsageError
from gateway.config.compile import build_policy
from gateway.policy.core import Plane, RequestFacts
from gateway.policy.hosts import DEFAULT_PORTS


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


def cmd_policy_test(args: argparse.Namespace) -> int:
    loaded = load_from_args(args)
    policy = build_policy(loaded.config)
    decision = policy.decide(facts_from_url(args.method, args.url, args.header))
    result = {
        "decision": decision.verdict.value,
        "rule": decision.rule,
        "reason": decision.reason,
        "injected": [i.as_dict() for i in decision.injections],
    }
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"decision: {result['decision']}")
        print(f"rule:     {result['rule'] or '-'}")
        print(f"reason:   {result['reason']}")
        injected = ", ".join(f"{i['secret']} -> {i['location']}" for i in result["injected"])
        print(f"injects:  {injected or '-'}")
    return 1 if args.exit_code and not decision.allowed else 0


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
    t.add_argument("--json", action="store_true", help="print the decision as JSON")
    t.add_argument(
        "--exit-code", action="store_true", help="exit 1 when the request would be denied (CI)"
    )
    t.set_defaults(func=cmd_policy_test)
