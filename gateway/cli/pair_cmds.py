"""`keyward up | down | status | logs | exec`: a gateway + agent pair through the engine socket."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.cli.config_cmds import add_config_option, load_from_args
from gateway.cli.console import console as make_console
from gateway.cli.console import table as make_table
from gateway.cli.engine_cmds import add_engine_socket_option
from gateway.cli.main import EXIT_OK
from gateway.engine.client import EngineClient, ExecStream
from gateway.engine.discovery import find_engine
from gateway.engine.errors import EngineError, EngineUnavailable, NotFound
from gateway.engine.stream import Stream
from gateway.errors import KeywardError, UsageError

T = TypeVar("T")


def add_name_option(p: argparse.ArgumentParser) -> None:
    from gateway.pair.spec import DEFAULT_NAME

    p.add_argument("--name", default=DEFAULT_NAME, help="pair name (default: %(default)s)")
    add_engine_socket_option(p)


def run_with_engine(args: argparse.Namespace, fn: Callable[[EngineClient], Awaitable[T]]) -> T:
    """Find the engine (an explicit --engine-socket that is dead is an error) and run `fn`;
    a raw engine error becomes one sentence that says what to do."""
    found = find_engine(explicit=getattr(args, "engine_socket", None), fallback=True)

    async def go() -> T:
        async with EngineClient(found.socket_path) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except EngineError as e:
        raise KeywardError(engine_advice(e, getattr(args, "name", None) or "default")) from None
    finally:
        found.close()  # the API service keyward started for this command, if any


def engine_advice(e: EngineError, pair: str) -> str:
    """One sentence for an engine failure in a pair command: what happened, what to run."""
    said = f"(engine said: {e.message.splitlines()[0] if e.message else e.status})"
    opt = "" if pair == "default" else f" --name {pair}"
    if isinstance(e, EngineUnavailable):
        return f"the container engine stopped answering {said}; check that it runs (keyward engine)"
    text = f"{e.message} {e.cause or ''}".lower()
    if "not running" in text or "state improper" in text:
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
    from gateway.pair.lifecycle import up
    from gateway.pair.spec import PairOptions, check_pair_name, default_agent_user

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
        agent_user=args.agent_user or default_agent_user(os.environ, os.getuid(), os.getgid()),
        agent_read_only=args.agent_read_only,
        extra_hosts=tuple(args.add_host or ()),
        ready_timeout=args.timeout,
    )
    err = make_console(stderr=True)
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
    from gateway.pair.lifecycle import down

    async def go(client: EngineClient) -> tuple[list[str], int]:
        removed = await down(client, args.name, keep_state=args.keep_state)
        running = len(await client.container_list(all=False)) if args.stop_machine else 0
        return removed, running

    removed, running = run_with_engine(args, go)
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print(f"nothing labelled keyward.pair={args.name}")
    if args.stop_machine:
        from gateway.engine.machine import stop_machine_if_idle

        if sys.platform != "darwin":
            print("--stop-machine: podman machines are a macOS thing; nothing to stop here")
        else:
            try:
                print(stop_machine_if_idle(running))
            except RuntimeError as e:
                raise KeywardError(str(e)) from None
    return EXIT_OK


EXIT_DEGRADED = 3


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 healthy, 3 degraded (with the reasons), 1 when there is no such pair."""
    from gateway.pair.lifecycle import pair_health, read_audit

    async def go(client: EngineClient) -> tuple[Any, Counter[str]]:
        health = await pair_health(client, args.name)
        counts: Counter[str] = Counter()
        gw = health.members["gateway"]
        if gw.state == "running":
            counts.update(str(r.get("decision", "?")) for r in await read_audit(client, gw.id))
        return health, counts

    health, counts = run_with_engine(args, go)
    if args.json:
        print(json.dumps({**health.as_json(), "audit": dict(counts)}, indent=2))
        return EXIT_OK if health.healthy else EXIT_DEGRADED
    table = make_table(f"keyward pair {args.name}")
    for col in ("role", "id", "state", "health"):
        table.add_column(col)
    for member in health.as_json()["members"]:
        table.add_row(member["role"], member["id"][:12] or "-", member["state"], member["health"])
    con = make_console()
    con.print(table)
    audit = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no requests yet"
    con.print(f"audit: {audit}")
    if health.healthy:
        con.print("healthy")
        return EXIT_OK
    opt = "" if args.name == "default" else f" --name {args.name}"
    for p in health.problems:
        con.print(f"degraded: {p}", highlight=False)
    if any(not p.startswith("credential ") for p in health.problems):
        con.print(f"keyward restart{opt} brings it back", highlight=False)
    return EXIT_DEGRADED


def cmd_restart(args: argparse.Namespace) -> int:
    from gateway.pair.lifecycle import restart

    err = make_console(stderr=True)
    t0 = time.monotonic()

    async def go(client: EngineClient) -> list[str]:
        with err.status("restarting") as status:
            return await restart(
                client, args.name, args.member, ready_timeout=args.timeout, say=status.update
            )

    done = run_with_engine(args, go)
    err.print(f"pair [bold]{args.name}[/]: restarted {', '.join(done)} in "
              f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from gateway.pair.lifecycle import container_of

    async def go(client: EngineClient) -> None:
        cid = await container_of(client, args.name, args.role)
        async for stream, data in client.container_logs(cid, follow=args.follow):
            out = sys.stderr if stream == Stream.STDERR else sys.stdout
            out.buffer.write(data)
            out.flush()

    run_with_engine(args, go)
    return EXIT_OK


def cmd_exec(args: argparse.Namespace) -> int:
    """Like `docker exec [-i] [-t]`: stdin copied as it arrives, a TTY with the local window
    size (and its changes), the command's exit code."""
    from gateway.cli.terminal import on_resize, quietly, raw_terminal, read_stdin, terminal_size
    from gateway.pair.lifecycle import container_of, stream_exec
    from gateway.pair.spec import EXEC_WAITS, guarded

    cmd = _command(args)
    if not cmd:
        raise UsageError("exec: give a command after --")
    tty = bool(args.tty)
    if tty and not sys.stdin.isatty():
        raise UsageError("exec -t: stdin is not a terminal (leave out -t when piping)")

    def write(stream: Stream, data: bytes) -> None:
        out = sys.stderr if stream == Stream.STDERR else sys.stdout
        out.buffer.write(data)
        out.flush()

    def resizing(ex: ExecStream) -> Any:
        @contextlib.asynccontextmanager
        async def ctx() -> AsyncIterator[None]:
            await quietly(ex.resize(*terminal_size()))  # before the first output is read
            with on_resize(ex.resize):
                yield

        return ctx()

    async def go(client: EngineClient) -> int:
        cid = await container_of(client, args.name, "agent")
        # the same guard as the agent's own command: nothing runs before the rules are in place
        return await stream_exec(
            client,
            cid,
            guarded(cmd, EXEC_WAITS),
            write,
            stdin=read_stdin() if args.interactive else None,
            tty=tty,
            on_start=resizing if tty else None,
        )

    with raw_terminal(sys.stdin.fileno()) if tty and args.interactive else contextlib.nullcontext():
        return run_with_engine(args, go)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.pair.spec import DEFAULT_AGENT_IMAGE, DEFAULT_AGENT_USER, DEFAULT_GATEWAY_IMAGE

    p = sub.add_parser("up", help="launch a gateway + agent pair through the engine socket")
    add_config_option(p)
    add_name_option(p)
    p.add_argument("--gateway-image", default=DEFAULT_GATEWAY_IMAGE, metavar="IMG")
    p.add_argument("--agent-image", default=DEFAULT_AGENT_IMAGE, metavar="IMG")
    p.add_argument(
        "--agent-user",
        metavar="UID:GID",
        help="the agent's user (default: yours, so workspace files stay yours; under sudo the "
        f"user behind it; as plain root {DEFAULT_AGENT_USER})",
    )
    p.add_argument("--agent-read-only", action="store_true", help="read-only agent root")
    p.add_argument("--workspace", metavar="DIR", help="bind-mounted at /workspace in the agent")
    p.add_argument(
        "--network", action="append", metavar="NET", help="network the gateway joins (repeatable)"
    )
    p.add_argument("--add-host", action="append", metavar="HOST:IP", help="extra /etc/hosts line")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the gateway")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD... for the agent")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="remove a pair (containers, volumes, networks) by its label")
    add_name_option(p)
    p.add_argument("--keep-state", action="store_true", help="keep the state volume (CA key)")
    p.add_argument(
        "--stop-machine",
        action="store_true",
        help="macOS: then stop the podman machine, unless other containers still run in it",
    )
    p.set_defaults(func=cmd_down)

    p = sub.add_parser(
        "status", help="a pair's containers, readiness, audit counts; exit 3 when degraded"
    )
    add_name_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "restart", help="restart a pair's member in the order that keeps the agent guarded"
    )
    add_name_option(p)
    p.add_argument("member", nargs="?", choices=("gateway", "agent"), help="default: both")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the gateway")
    p.set_defaults(func=cmd_restart)

    p = sub.add_parser("logs", help="a pair's gateway or agent logs")
    add_name_option(p)
    p.add_argument("role", nargs="?", choices=("gateway", "agent"), default="gateway")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("exec", help="run a command in a pair's agent (exit code passed on)")
    add_name_option(p)
    p.add_argument("-i", "--interactive", action="store_true", help="copy stdin to the command")
    p.add_argument("-t", "--tty", action="store_true", help="a terminal for the command")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    p.set_defaults(func=cmd_exec)
