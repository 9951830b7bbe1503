"""`keyward audit verify [NAME]`: attack a running pair's agent and print what held."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.console import console as make_console
from gateway.cli.console import table as make_table
from gateway.cli.engine_cmds import add_engine_socket_option
from gateway.cli.main import EXIT_FAILURE, EXIT_OK
from gateway.engine.client import EngineClient


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.cli.pair_cmds import run_with_engine
    from gateway.pair.lifecycle import container_of
    from gateway.pair.verify import verify_pair

    store = None
    if args.config:
        from gateway.config.loader import load_config
        from gateway.credentials.sources import load_secrets

        loaded = load_config(args.config)
        store = load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)

    async def go(client: EngineClient) -> list[dict[str, Any]]:
        gw = await container_of(client, args.name, "gateway")
        agent = await container_of(client, args.name, "agent")
        with make_console(stderr=True).status("attacking from inside the agent"):
            return await verify_pair(client, gw, agent, store)

    results = run_with_engine(args, go)
    failed = [r for r in results if not r["ok"]]
    if args.json:
        import json

        report = {"pair": args.name, "results": results, "failed": len(failed)}
        print(json.dumps(report, default=str))
        return EXIT_FAILURE if failed or not results else EXIT_OK
    table = make_table(f"sandbox contract: pair {args.name}")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(
            str(r["check"]), "[green]pass[/]" if r["ok"] else "[red]FAIL[/]", str(r["detail"])
        )
    con = make_console()
    con.print(table)
    con.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return EXIT_FAILURE if failed or not results else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    """Exit 0 when the candidate decides every replayable record as recorded, 1 otherwise."""
    import json
    import sys
    from pathlib import Path

    from gateway.audit.reader import read_records
    from gateway.audit.replay import replay
    from gateway.cli.config_cmds import load_from_args
    from gateway.config.compile import build_policy
    from gateway.errors import UsageError

    loaded = load_from_args(args)
    policy = build_policy(loaded.config)
    paths = [Path(p) for p in args.audit] or [_default_audit(loaded)]
    records: list[dict[str, Any]] = []
    for path in paths:
        try:
            records.extend(read_records(path))
        except OSError as e:
            raise UsageError(f"audit log {path}: {e.strerror or e}") from None
    report = replay(policy, records)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_FAILURE if report.changed else EXIT_OK
    d = report.as_dict()
    skipped = sum(report.not_replayable.values())
    print(
        f"replayed {d['replayed']} records under {args.config or 'the config'}: "
        f"{d['unchanged']} unchanged, {d['newly_denied']} newly denied, "
        f"{d['newly_allowed']} newly allowed, {d['injections_changed']} with other injections"
        + (f"; {skipped} not replayable" if skipped else "")
    )
    for why, n in sorted(report.not_replayable.items()):
        print(f"  not replayable: {n} x {why} (decided on facts the audit log does not keep)")
    for g in d["groups"]:
        kinds = ", ".join(f"{n} {k}" for k, n in g["kinds"].items())
        print(f"{g['host']}: rule {g['rule_before']!r} -> {g['rule_after']!r}: {kinds}")
        for what in ("injections_added", "injections_removed"):
            if g[what]:
                print(f"  {what.replace('_', ' ')}: {', '.join(g[what])}")
        print(f"  e.g. {'; '.join(g['examples'])}")
    return EXIT_FAILURE if report.changed else EXIT_OK


def _default_audit(loaded: Any) -> Any:
    """The candidate config's own audit.path, relative to the config file like the gateway."""
    from pathlib import Path

    target = Path(loaded.config.audit.path)
    return target if target.is_absolute() else loaded.base_dir / target


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="check a running pair (verify) or a candidate policy (replay)")
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
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(func=cmd_verify)
    r = asub.add_parser(
        "replay",
        help="re-decide recorded requests under a candidate policy (exit 1 if anything changes)",
    )
    r.add_argument("-c", "--config", metavar="FILE", help="the candidate config")
    r.add_argument(
        "audit", nargs="*", metavar="AUDIT", help="audit logs (default: the config's audit.path)"
    )
    r.add_argument("--json", action="store_true", help="machine-readable report")
    r.set_defaults(func=cmd_replay)
