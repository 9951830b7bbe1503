"""`keyward serve`: the sidecar. `keyward serve --wait-ready` waits for one to be ready."""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import socket
import time
from pathlib import Path

from gateway.cli.config_cmds import add_config_option, load_from_args
from gateway.config.paths import state_dir
from gateway.errors import KeywardError, UsageError
from gateway.netfilter.rules import PodPorts

DEFAULT_PROXY_USER = "keyward"
DEFAULT_PROXY_UID = 10101
DEFAULT_AGENT_UID = 1000  # the agent container's uid in a pod


def proxy_ids(spec: str | None) -> tuple[int, int]:
    """--proxy-uid: a number or a user name; default the `keyward` user, else uid 10101."""
    spec = spec or os.environ.get("KEYWARD_PROXY_UID")
    if spec is None:
        try:
            pw = pwd.getpwnam(DEFAULT_PROXY_USER)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            return DEFAULT_PROXY_UID, DEFAULT_PROXY_UID
    if spec.isdigit():
        return int(spec), int(spec)
    try:
        pw = pwd.getpwnam(spec)
    except KeyError:
        raise UsageError(f"--proxy-uid: no such user {spec!r}") from None
    return pw.pw_uid, pw.pw_gid


def ports_from_args(args: argparse.Namespace) -> PodPorts:
    extra = {"control": args.metrics_port} if getattr(args, "metrics_port", None) else {}
    return PodPorts(
        transparent=args.transparent_port,
        explicit=args.explicit_port,
        dns=args.dns_port,
        services=tuple(args.service_port or ()),
        **extra,
    )


def wait_ready(port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return 0
        except OSError:
            time.sleep(0.1)
    raise KeywardError(f"gateway not ready on 127.0.0.1:{port} after {timeout:.0f} s")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.wait_ready:
        return wait_ready(args.explicit_port, args.timeout)
    from gateway.runtime.sidecar import ServeOptions, serve

    loaded = load_from_args(args)
    uid, gid = proxy_ids(args.proxy_uid)
    sdir = state_dir(args.state)
    opts = ServeOptions(
        state_dir=sdir,
        proxy_uid=uid,
        proxy_gid=gid,
        ports=ports_from_args(args),
        netfilter=not args.no_netfilter,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        control_socket=Path(args.control_socket)
        if args.control_socket
        else sdir / "control" / "keyward.sock",
        drain_seconds=args.drain,
        agent=args.agent,
        audit_path=args.audit,
        trust_dir=Path(args.trust_dir) if args.trust_dir else None,
        trust_mount=args.trust_mount or args.trust_dir or "/etc/keyward",
        metrics_port=args.metrics_port,
        agent_uid=args.agent_uid,
        agent_gid=args.agent_gid,
        agent_masked=args.agent_masked,
        placeholder_seed=Path(args.placeholder_seed) if args.placeholder_seed else None,
    )
    return asyncio.run(serve(loaded, opts))


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running `keyward serve` to reload its config and secrets (its control socket)."""
    import json

    path = Path(args.control_socket) if args.control_socket else None
    if path is None:
        path = state_dir(args.state) / "control" / "keyward.sock"
    if not path.exists():
        raise KeywardError(f"no gateway control socket at {path} (is keyward serve running?)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(args.timeout)
        s.connect(str(path))
        s.sendall(b"POST /reload HTTP/1.0\r\nHost: keyward\r\nContent-Length: 0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    body = data.partition(b"\r\n\r\n")[2]
    try:
        answer = json.loads(body)
    except ValueError:
        raise KeywardError(f"unexpected answer from {path}") from None
    if not answer.get("reloaded"):
        raise KeywardError(
            f"reload refused; the gateway keeps policy {answer.get('policy')} (its log says why)"
        )
    print(f"reloaded: policy {answer.get('policy')}")
    return 0


def listener_port(text: str) -> int:
    """A listener port: these are netfilter rule targets, so a fixed number (no 0 = any)."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def add_port_options(p: argparse.ArgumentParser) -> None:
    d = PodPorts()
    p.add_argument("--transparent-port", type=listener_port, default=d.transparent, metavar="N")
    p.add_argument("--explicit-port", type=listener_port, default=d.explicit, metavar="N")
    p.add_argument("--dns-port", type=listener_port, default=d.dns, metavar="N")
    p.add_argument(
        "--service-port",
        type=listener_port,
        action="append",
        metavar="N",
        help="a service-plane port agents may reach (repeatable)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gateway sidecar of a pod")
    add_config_option(p)
    add_port_options(p)
    p.add_argument("--state", metavar="DIR", help="state dir (CA, OAuth cache)")
    p.add_argument("--proxy-uid", metavar="UID|USER", help="uid the gateway runs as after start")
    p.add_argument(
        "--no-netfilter", action="store_true", help="do not apply rules (an init step already did)"
    )
    p.add_argument("--ready-file", metavar="FILE", help="written when ready, removed on stop")
    p.add_argument("--control-socket", metavar="PATH", help="health/readiness/metrics unix socket")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="also serve /metrics, /healthz, /readyz on TCP port N (the pod's control port:"
        " the netfilter rules keep it closed to agent uids)",
    )
    p.add_argument("--audit", metavar="FILE", help="audit log (overrides audit.path)")
    p.add_argument(
        "--placeholder-seed",
        metavar="FILE",
        help="placeholder seed to use (32 bytes; `keyward kube render` ships one in the Secret)",
    )
    p.add_argument("--trust-dir", metavar="DIR", help="write the agent's trust files here at start")
    p.add_argument("--trust-mount", metavar="PATH", help="where the agent sees --trust-dir")
    p.add_argument("--agent", default="agent", help="agent name written to audit records")
    p.add_argument(
        "--agent-uid",
        type=int,
        default=int(os.environ.get("KEYWARD_AGENT_UID", DEFAULT_AGENT_UID)),
        metavar="UID",
        help="uid agents run as (default $KEYWARD_AGENT_UID, else %(default)s): serve refuses to"
        " start while a file: secret or the .env is readable by it",
    )
    p.add_argument("--agent-gid", type=int, metavar="GID", help="agent gid (default: its own)")
    p.add_argument(
        "--agent-masked",
        action="store_true",
        help="the agent's mount namespace masks the config, .env, file: secrets and state dir"
        " (keyward run --isolate does this): readable secret files are then not refused",
    )
    p.add_argument(
        "--drain", type=float, default=10.0, metavar="S", help="stream drain bound on stop"
    )
    p.add_argument(
        "--wait-ready",
        action="store_true",
        help="do not serve: wait until a gateway in this namespace is ready",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="with --wait-ready")
    p.set_defaults(func=cmd_serve)

    r = sub.add_parser("reload", help="reload config and secrets of a running gateway")
    r.add_argument("--state", metavar="DIR", help="state dir of the gateway")
    r.add_argument("--control-socket", metavar="PATH", help="its control socket")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    r.set_defaults(func=cmd_reload)
