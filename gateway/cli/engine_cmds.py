"""`keyward engine`: which engine socket was found and how, what answers on it, which API version.

When nothing is found it prints every place it looked and why each failed: "no engine" alone
leaves users guessing, and the socket is often somewhere unusual (rootless, VM-backed desktops).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from gateway.cli.console import console as make_console
from gateway.cli.console import table as make_table
from gateway.cli.main import EXIT_FAILURE, EXIT_OK
from gateway.engine.client import EngineClient
from gateway.engine.discovery import ENV_EXPLICIT, Discovery, find_engine
from gateway.engine.errors import Attempt, EngineError, EngineNotFound


def add_engine_socket_option(p: argparse.ArgumentParser) -> None:
    """The same `--engine-socket` option for every command that talks to an engine."""
    p.add_argument(
        "--engine-socket",
        metavar="PATH",
        help=f"engine API socket (unix path or unix:// URL; default ${ENV_EXPLICIT}, "
        "DOCKER_HOST, CONTAINER_HOST, docker context, then well-known places)",
    )


async def describe(found: Discovery) -> dict[str, Any]:
    """Ask the engine at `found` what it is; facts for the table or --json."""
    async with EngineClient(found.socket_path) as client:
        ping = await client.ping()
        version = await client.version()
        negotiated = await client.negotiate()
        server_max, server_min = client.server_api_versions
        rootless = await client.is_rootless()
    return {
        "socket": str(found.socket_path),
        "found_by": found.how,
        "kind": ping.kind,
        "engine_version": version.get("Version"),
        "api_version": negotiated,
        "server_api_max": server_max,
        "server_api_min": server_min,
        "libpod_api_version": ping.libpod_api_version,
        "rootless": rootless,
        "tried": [_attempt(a) for a in found.tried],
    }


def _attempt(a: Attempt) -> dict[str, Any]:
    return {"source": a.source, "location": a.location, "reason": a.reason}


def _not_found(e: EngineNotFound, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": e.summary, "tried": [_attempt(a) for a in e.tried]}, indent=2))
        return EXIT_FAILURE
    sys.stderr.write(f"keyward: {e.summary}\n")
    table = make_table("places tried")
    for col in ("source", "location", "why not"):
        table.add_column(col)
    for a in e.tried:
        table.add_row(a.source, a.location, a.reason or "ok")
    make_console(stderr=True).print(table)
    return EXIT_FAILURE


def cmd_engine(args: argparse.Namespace) -> int:
    try:
        found = find_engine(explicit=args.engine_socket, fallback=True)
    except EngineNotFound as e:
        return _not_found(e, args.json)
    if found.service is not None and args.keep:
        found.service.keep = True
    try:
        facts = asyncio.run(describe(found))
    except EngineError as e:
        raise EngineError(
            e.status, f"{found.socket_path} (found by {found.how}) did not answer: {e.message}"
        ) from None
    finally:
        found.close()
    if found.service is not None:
        facts["service"] = {
            "pid": found.service.pid,
            "socket": str(found.service.socket_path),
            "kept": found.service.keep,
        }
    if args.json:
        print(json.dumps(facts, indent=2))
        return EXIT_OK
    api = facts["api_version"]
    span = f"server {facts['server_api_min'] or '?'} … {facts['server_api_max'] or '?'}"
    kind = facts["kind"]
    if facts["libpod_api_version"]:
        kind += f" (libpod API {facts['libpod_api_version']})"
    table = make_table("container engine", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("socket", facts["socket"])
    table.add_row("found by", facts["found_by"])
    table.add_row("kind", kind)
    table.add_row("engine version", str(facts["engine_version"] or "?"))
    table.add_row("API version", f"{api} ({span})")
    table.add_row("rootless", "yes" if facts["rootless"] else "no")
    if found.service is not None:
        what = (
            f"kept running: export CONTAINER_HOST=unix://{found.service.socket_path} "
            f"(stop: kill {found.service.pid})"
            if found.service.keep
            else "no API socket answered: started for this command and stopped (--keep keeps it)"
        )
        table.add_row("podman service", what)
    make_console().print(table)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "engine", help="which engine socket was found, how, engine kind and API version"
    )
    add_engine_socket_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--keep",
        action="store_true",
        help="if keyward had to start a Podman API service, leave it running and say where",
    )
    p.set_defaults(func=cmd_engine)
