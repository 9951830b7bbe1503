"""`keyward up | down | status | logs | exec`: a gateway + agent pair through the engine socket."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from gateway.cli.config_cmds import add_config_option, load_from_args
from gateway.cli.console import console as make_console
from gateway.cli.engine_cmds import add_engine_socket_option
from gateway.cli.errors import EXIT_OK, KeywardError, UsageError
from gateway.engine.client import EngineClient
from gateway.engine.discovery import find_engine
from gateway.engine.errors import Conflict, EngineError, EngineUnavailable, NotFound
from gateway.engine.stream import Stream

T = TypeVar("T")


def add_name_option(p: argparse.ArgumentParser) -> None:
    from gateway.engine.pair import DEFAULT_NAME

    p.add_argument("--name", default=DEFAULT_NAME, help="pair name (default: %(default)s)")
    add_engine_socket_option(p)


def run_with_engine(args: argparse.Namespace, fn: Callable[[EngineClient], Awaitable[T]]) -> T:
    """Find the engine (an explicit --engine-socket that is dead is an error) and run `fn`;
    a raw engine error becomes one sentence that says what to do."""
    found = find_engine(explicit=getattr(args, "engine_socket", None))

    async def go() -> T:
        async with EngineClient(found.socket_path) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except EngineError as e:
        raise KeywardError(engine_advice(e, getattr(args, "name", None) or "default")) from None


def engine_advice(e: EngineError, pair: str) -> str:
    """One sentence for an engine failure in a pair command: what happened, what to run."""
    said = f"(engine said: {e.message.splitlines()[0] if e.message else e.status})"
    opt = "" if pair == "default" else f" --name {pair}"
    if isinstance(e, EngineUnavailable):
        return f"the container engine stopped answering {said}; check that it runs (keyward engine)"
    text = f"{e.message} {e.cause or ''}".lower()
    if isinstance(e, Conflict) and "not running" in text:
        return (
            f"a container of pair {pair!r} is not running {said}; keyward status{opt} shows "
            f"which and why, keyward restart{opt} starts it again"
        )
    if isinstance(e, NotFound):
        return (
            f"pair {pair!r} lacks something the engine was asked for, so it was probably "
            f"removed {said}; keyward status{opt} shows what is left, keyward up{opt} recreates it"
        )
    return f"the engine refused {said}; keyward status{opt} and keyward logs{opt} may say why"


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.credentials.sources import load_secrets
    from gateway.engine.pair import PairOptions, check_pair_name, up

    check_pair_name(args.name)
    loaded = load_from_args(args)
    # Every secret is resolved here, on the host: a missing one fails before anything exists.
    store = load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)
    if args.workspace is not None and not Path(args.workspace).is_dir():
        raise UsageError(f"--workspace {args.workspace}: not a directory")
    opts = PairOptions(
        name=args.name,
        gateway_image=args.gateway_image,
        agent_image=args.agent_image,
        workspace=Path(args.workspace) if args.workspace else None,
        networks=tuple(args.network or ()),
        command=_command(args),
        agent_user=args.agent_user,
        agent_read_only=args.agent_read_only,
        extra_hosts=tuple(args.add_host or ()),
        ready_timeout=args.timeout,
    )
    err = Console(stderr=True)
    t0 = time.monotonic()

    async def go(client: EngineClient) -> Any:
        with err.status("starting the pair") as status:
            return await up(client, loaded, store, opts, say=status.update)

    info = run_with_engine(args, go)
    took = time.monotonic() - t0
    for warning in info.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, markup=True)
    err.print(
        f"pair [bold]{info.name}[/]: gateway ready in {info.ready_seconds:.1f} s, "
        f"up in {took:.1f} s; agent {info.agent_id[:12]} "
        f"(keyward exec --name {info.name} -- sh)"
    )
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from gateway.engine.pair import down

    removed = run_with_engine(args, lambda c: down(c, args.name, keep_state=args.keep_state))
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print(f"nothing labelled keyward.pair={args.name}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.engine.pair import find_pair, read_audit, ready_file_present

    async def go(client: EngineClient) -> tuple[list[list[str]], Counter[str]]:
        pair = await find_pair(client, args.name)
        rows = []
        counts: Counter[str] = Counter()
        for role in ("gateway", "agent"):
            c = pair.get(role)
            if c is None:
                rows.append([role, "-", "missing", "-"])
                continue
            running = c.get("State") == "running"
            health = "-"
            if role == "gateway" and running:
                health = "ready" if await ready_file_present(client, c["Id"]) else "not ready"
                records = await read_audit(client, c["Id"])
                counts.update(str(r.get("decision", "?")) for r in records)
            rows.append([role, str(c["Id"])[:12], str(c.get("Status") or c.get("State")), health])
        return rows, counts

    rows, counts = run_with_engine(args, go)
    if args.json:
        import json

        members = [dict(zip(("role", "id", "state", "health"), r, strict=True)) for r in rows]
        print(json.dumps({"pair": args.name, "members": members, "audit": dict(counts)}))
        return EXIT_OK
    table = Table(title=f"keyward pair {args.name}", title_justify="left")
    for col in ("role", "id", "state", "health"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    con = make_console()
    con.print(table)
    audit = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no requests yet"
    con.print(f"audit: {audit}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from gateway.engine.pair import container_of

    async def go(client: EngineClient) -> None:
        cid = await container_of(client, args.name, args.role)
        async for stream, data in client.container_logs(cid, follow=args.follow):
            out = sys.stderr if stream == Stream.STDERR else sys.stdout
            out.buffer.write(data)
            out.flush()

    run_with_engine(args, go)
    return EXIT_OK


def cmd_exec(args: argparse.Namespace) -> int:
    from gateway.engine.pair import container_of, stream_exec

    cmd = _command(args)
    if not cmd:
        raise UsageError("exec: give a command after --")

    def write(stream: Stream, data: bytes) -> None:
        out = sys.stderr if stream == Stream.STDERR else sys.stdout
        out.buffer.write(data)
        out.flush()

    async def go(client: EngineClient) -> int:
        cid = await container_of(client, args.name, "agent")
        return await stream_exec(client, cid, cmd, write)

    return run_with_engine(args, go)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.engine.pair import DEFAULT_AGENT_IMAGE, DEFAULT_AGENT_USER, DEFAULT_GATEWAY_IMAGE

    p = sub.add_parser("up", help="launch a gateway + agent pair through the engine socket")
    add_config_option(p)
    add_name_option(p)
    p.add_argument("--gateway-image", default=DEFAULT_GATEWAY_IMAGE, metavar="IMG")
    p.add_argument("--agent-image", default=DEFAULT_AGENT_IMAGE, metavar="IMG")
    p.add_argument("--agent-user", default=DEFAULT_AGENT_USER, metavar="UID:GID")
    p.add_argument("--agent-read-only", action="store_true", help="read-only agent root")
    p.add_argument("--workspace", metavar="DIR", help="bind-mounted at /workspace in the agent")
    p.add_argument(
        "--network", action="append", metavar="NET", help="network the gateway joins (repeatable)"
    )
    p.add_argument("--add-host", action="append", metavar="HOST:IP", help="extra /etc/hosts line")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the gateway")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD... for the agent")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="remove a pair (agent, gateway, volumes, networks)")
    add_name_option(p)
    p.add_argument("--keep-state", action="store_true", help="keep the state volume (CA key)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="a pair's containers, readiness and audit counts")
    add_name_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a pair's gateway or agent logs")
    add_name_option(p)
    p.add_argument("role", nargs="?", choices=("gateway", "agent"), default="gateway")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("exec", help="run a command in a pair's agent (exit code passed on)")
    add_name_option(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    p.set_defaults(func=cmd_exec)
