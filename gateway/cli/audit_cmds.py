"""`keyward audit verify [NAME]`: attack a running pair's agent and print what held."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.cli.console import console as make_console
from gateway.cli.engine_cmds import add_engine_socket_option
from gateway.cli.errors import EXIT_FAILURE, EXIT_OK
from gateway.engine.client import EngineClient


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.cli.pair_cmds import run_with_engine
    from gateway.engine.pair import container_of
    from gateway.engine.verify import verify_pair

    store = None
    if args.config:
        from gateway.config.loader import load_config
        from gateway.credentials.sources import load_secrets

        loaded = load_config(args.config)
        store = load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)

    async def go(client: EngineClient) -> list[dict[str, Any]]:
        gw = await container_of(client, args.name, "gateway")
        agent = await container_of(client, args.name, "agent")
        with Console(stderr=True).status("attacking from inside the agent"):
            return await verify_pair(client, gw, agent, store)

    results = run_with_engine(args, go)
    table = Table(title=f"sandbox contract: pair {args.name}", title_justify="left")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(
            str(r["check"]), "[green]pass[/]" if r["ok"] else "[red]FAIL[/]", str(r["detail"])
        )
    con = make_console()
    con.print(table)
    failed = [r for r in results if not r["ok"]]
    con.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return EXIT_FAILURE if failed or not results else EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="check a running pair against the sandbox contract")
    asub = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    v = asub.add_parser("verify", help="attempt the DESIGN §6 attacks from inside the agent")
    v.add_argument("name", nargs="?", default="default", help="pair name (default: %(default)s)")
    v.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="also hash the host-resolved secrets of this config",
    )
    add_engine_socket_option(v)
    v.set_defaults(func=cmd_verify)
