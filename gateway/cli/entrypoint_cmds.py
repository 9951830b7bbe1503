"""`keyward entrypoint render --out DIR`: the agent side's trust files (no image change needed)."""

from __future__ import annotations

import argparse

from gateway.config.paths import state_dir
from gateway.tls.ca import CertificateAuthority
from gateway.tls.trust import render_agent_trust

DEFAULT_MOUNT = "/etc/keyward"


def cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    ca = CertificateAuthority.load_or_create(state_dir(args.state))
    written = render_agent_trust(ca, Path(args.out), f"{args.mount}/ca-bundle.crt")
    for p in written:
        print(p)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("entrypoint", help="agent-side trust: CA bundle, env file, wrapper")
    psub = p.add_subparsers(dest="entrypoint_command", metavar="SUBCOMMAND", required=True)
    r = psub.add_parser(
        "render", help="write ca.crt, ca-bundle.crt, trust.env, agent-entrypoint.sh"
    )
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--state", metavar="DIR", help="state dir holding the gateway CA")
    r.add_argument(
        "--mount",
        default=DEFAULT_MOUNT,
        metavar="PATH",
        help=f"where DIR is mounted in the agent (default {DEFAULT_MOUNT})",
    )
    r.set_defaults(func=cmd_render)
