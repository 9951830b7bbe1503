"""`keyward netfilter render|apply|verify|remove`: the pod's rules, for entrypoints and checks."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from gateway.cli.main import EXIT_FAILURE, EXIT_OK
from gateway.cli.serve_cmds import add_port_options, ports_from_args, proxy_ids
from gateway.errors import UsageError
from gateway.netfilter.rules import FAMILIES, Family, PodPorts, render


def rendered_from_args(args: argparse.Namespace) -> dict[int, str]:
    """The rules the options describe, keyed by address family."""
    uid, _ = proxy_ids(args.proxy_uid)
    base = ports_from_args(args)
    one: dict[str, tuple[Family, ...]] = {"4": (4,), "6": (6,)}
    families = one.get(args.family, FAMILIES)
    extra = tuple(args.agent_port or ())
    try:
        ports = replace(base, control=args.control_port)
        return {f: render(uid, ports, family=f, agent_ports_ok=extra) for f in families}
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_render(args: argparse.Namespace) -> int:
    rendered = rendered_from_args(args)
    for family, text in rendered.items():
        if len(rendered) > 1:
            tool = "iptables" if family == 4 else "ip6tables"
            sys.stdout.write(f"# {tool}-restore --noflush\n")
        sys.stdout.write(text)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from gateway.netfilter.apply import apply, verify

    rendered = rendered_from_args(args)
    apply(rendered, netns=args.netns)
    drift = verify(rendered, netns=args.netns)
    if drift:  # the kernel did not keep what we wrote: say so rather than trust it
        sys.stdout.write("\n".join(drift) + "\n")
        sys.stderr.write("keyward: rules applied but not in force as rendered\n")
        return EXIT_FAILURE
    sys.stderr.write(f"keyward: netfilter rules applied ({_where(args)})\n")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.netfilter.apply import verify

    drift = verify(rendered_from_args(args), netns=args.netns)
    if getattr(args, "json", False):
        where = {"netns": args.netns}
        print(json.dumps({"in_force": not drift, "drift": drift, **where}))
        return EXIT_FAILURE if drift else EXIT_OK
    if drift:
        sys.stdout.write("\n".join(drift) + "\n")
        sys.stderr.write(f"keyward: netfilter rules drifted ({_where(args)})\n")
        return EXIT_FAILURE
    sys.stderr.write(f"keyward: netfilter rules in force ({_where(args)})\n")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    from gateway.netfilter.apply import remove

    remove(netns=args.netns)
    sys.stderr.write(f"keyward: netfilter rules removed ({_where(args)})\n")
    return EXIT_OK


def _where(args: argparse.Namespace) -> str:
    return f"namespace {args.netns}" if args.netns else "this namespace"


def _rule_options(p: argparse.ArgumentParser) -> None:
    add_port_options(p)
    p.add_argument(
        "--control-port",
        type=int,
        default=PodPorts().control,
        metavar="N",
        help="gateway control port on loopback, refused to every uid but the proxy's",
    )
    p.add_argument(
        "--agent-port",
        type=int,
        action="append",
        metavar="N",
        help="loopback port agents may use directly, not through the gateway (repeatable)",
    )
    p.add_argument("--proxy-uid", metavar="UID|USER", help="uid the gateway runs as")
    p.add_argument("--family", choices=("4", "6", "all"), default="all")


def _netns_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netns", metavar="NAME", help="run inside this named network namespace")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("netfilter", help="render, apply, verify or remove the pod's rules")
    cmds = p.add_subparsers(dest="netfilter_command", metavar="ACTION", required=True)
    render_p = cmds.add_parser("render", help="print iptables-restore --noflush input")
    _rule_options(render_p)
    render_p.set_defaults(func=cmd_render)
    for name, func, text in (
        ("apply", cmd_apply, "install the rules (atomic, idempotent)"),
        ("verify", cmd_verify, "compare live rules with the rendered ones; exit 1 on drift"),
    ):
        q = cmds.add_parser(name, help=text)
        _rule_options(q)
        _netns_option(q)
        q.set_defaults(func=func)
        if name == "verify":
            q.add_argument("--json", action="store_true", help="machine-readable result")
    remove_p = cmds.add_parser("remove", help="delete keyward's chains and jumps")
    _netns_option(remove_p)
    remove_p.set_defaults(func=cmd_remove)
