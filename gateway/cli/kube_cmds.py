"""`keyward kube render`: Secret + ConfigMap + Pod/Deployment for Kubernetes."""

from __future__ import annotations

import argparse
import os
import sys

from gateway.cli.config_cmds import add_config_option, load_from_args


def cmd_render(args: argparse.Namespace) -> int:
    from gateway.credentials.sources import load_secrets
    from gateway.kube import KubeOptions, render, to_yaml

    loaded = load_from_args(args)
    store = load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    opts = KubeOptions(
        agent_image=args.agent_image,
        name=args.name,
        kind=args.kind,
        gateway_image=args.gateway_image,
        namespace=args.namespace,
        agent_command=command,
        classic_sidecar=args.classic_sidecar,
        replicas=args.replicas,
    )
    text = to_yaml(render(loaded, store, opts))
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    # The Secret holds real credentials: the file is private from its first byte.
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output} (holds a Secret: keep it private; kubectl apply -f it)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kube", help="Kubernetes manifests for an agent pod with a keyward sidecar")
    ksub = p.add_subparsers(dest="kube_command", metavar="SUBCOMMAND", required=True)
    r = ksub.add_parser("render", help="print Secret + ConfigMap + Pod/Deployment YAML")
    add_config_option(r)
    r.add_argument("--agent-image", required=True, metavar="IMG", help="the agent's image")
    r.add_argument("--gateway-image", default="keyward-gateway:latest", metavar="IMG")
    r.add_argument("--name", default="agent", help="pair name (object names, audit records)")
    r.add_argument("--kind", choices=("pod", "deployment"), default="pod")
    r.add_argument("--replicas", type=int, default=1, help="with --kind deployment")
    r.add_argument("--namespace", metavar="NS", help="metadata.namespace of every object")
    r.add_argument(
        "--classic-sidecar",
        action="store_true",
        help="the sidecar as an ordinary container (clusters < 1.29, podman kube play)",
    )
    r.add_argument("-o", "--output", metavar="FILE", help="write here (mode 0600), not stdout")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the agent's command")
    r.set_defaults(func=cmd_render)
