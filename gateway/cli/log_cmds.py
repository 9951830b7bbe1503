"""`keyward log [--summary] [--follow] [FILE]`: the audit log as a table or a per-host summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.audit.reader import follow, read_records, summarise
from gateway.cli.console import console as make_console
from gateway.cli.console import table as make_table
from gateway.config.loader import load_config
from gateway.config.paths import config_path
from gateway.errors import UsageError

SUMMARY_COLUMNS = ("host", "allow", "warn", "deny", "injected", "bytes_up", "bytes_down", "alerts")
COLUMNS = ("ts", "plane", "decision", "method", "host", "path", "status", "reason", "injected")


def _audit_file(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    cfg_file = config_path(args.config)
    if cfg_file.exists():
        loaded = load_config(cfg_file)
        p = Path(loaded.config.audit.path)
        return p if p.is_absolute() else loaded.base_dir / p
    return Path("keyward-audit.jsonl")


def _cell(rec: dict[str, Any], col: str) -> str:
    v = rec.get(col)
    if col == "injected":
        return ", ".join(f"{i['secret']}@{i['location']}" for i in v or []) or "-"
    if col == "ts" and isinstance(v, str):
        return v[11:23]
    style = {"deny": "[red]", "warn": "[yellow]"}.get(str(v), "") if col == "decision" else ""
    text = "-" if v is None else str(v)
    return f"{style}{text}" if style else text


def cmd_log(args: argparse.Namespace) -> int:
    path = _audit_file(args)
    if not path.exists():
        raise UsageError(f"{path}: no audit log yet")
    console = make_console()
    if args.summary:
        rows = summarise(read_records(path))
        if args.json:
            print(json.dumps(rows))
            return 0
        table = make_table(f"{path}: per-host summary")
        for col in SUMMARY_COLUMNS:
            table.add_column(col, justify="left" if col == "host" else "right")
        for row in rows:
            table.add_row(*(str(row[c]) for c in SUMMARY_COLUMNS))
        console.print(table)
        return 0
    if args.follow:
        with path.open(encoding="utf-8") as f:
            for rec in follow(f):
                if args.json:  # one record per line, as written
                    print(json.dumps(rec), flush=True)
                    continue
                console.print("  ".join(_cell(rec, c) for c in COLUMNS), highlight=False)
        return 0
    if args.json:
        print(json.dumps(list(read_records(path))))
        return 0
    table = make_table(str(path))
    for col in COLUMNS:
        table.add_column(col)
    for rec in read_records(path):
        table.add_row(*(_cell(rec, c) for c in COLUMNS))
    console.print(table)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("log", help="read the audit log as a table or a per-host summary")
    p.add_argument("file", nargs="?", help="audit file (default: audit.path of the config)")
    p.add_argument("-c", "--config", metavar="FILE", help="config whose audit.path to read")
    p.add_argument("--summary", action="store_true", help="one row per host")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    p.add_argument(
        "--json",
        action="store_true",
        help="machine-readable: the records (JSON lines with --follow) or the summary",
    )
    p.set_defaults(func=cmd_log)
