"""`keyward init`, `keyward check`, `keyward schema`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.config.compile import build_policy
from gateway.config.loader import LoadedConfig, gc_paused, load_config
from gateway.config.model import config_schema
from gateway.config.paths import config_path
from gateway.errors import SecretsUnresolved, UsageError


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $KEYWARD_CONFIG or ./keyward.yaml)",
    )


def load_from_args(args: argparse.Namespace) -> LoadedConfig:
    return load_config(config_path(getattr(args, "config", None)))


@contextlib.contextmanager
def explained_secret_errors(loaded: LoadedConfig) -> Iterator[None]:
    """Turn a failure to resolve secrets into lines a newcomer can act on: where each secret
    is declared, and where its value may come from (never the value)."""
    from gateway.errors import SecretsError

    try:
        yield
    except SecretsError as e:
        name = loaded.path.name
        lines = []
        for err in e.errors:
            line = loaded.line_of(("secrets", err.secret)) if err.secret else 0
            lines.append(f"{name}:{line}: {err}" if line else f"{name}: {err}")
        dotenv = loaded.base_dir / ".env"
        unset = sorted(
            err.source.removeprefix("env ")
            for err in e.errors
            if err.source.startswith("env ") and err.problem == "is not set"
        )
        hint = "hint: "
        if unset:
            hint += (
                f"export {', '.join(unset)} in the shell that runs keyward, or put "
                f"{'them' if len(unset) > 1 else 'it'} in {dotenv} (KEY=value lines, "
                "chmod 600; keyward reads it, the agent never sees it); "
            )
        hint += (
            "or remove a secret you do not use with the lines naming it; "
            f"`keyward check --skip-secrets -c {loaded.path}` checks everything else"
        )
        raise SecretsUnresolved("\n".join([*lines, hint])) from None


def starter_text() -> str:
    return resources.files("gateway.config").joinpath("starter.yaml").read_text(encoding="utf-8")


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if target.exists() and not args.force:
        raise UsageError(f"{target} already exists (use --force to overwrite)")
    target.write_text(starter_text(), encoding="utf-8")
    print(f"wrote {target}; edit it, then run: keyward check -c {target}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    json.dump(config_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def describe(loaded: LoadedConfig) -> dict[str, Any]:
    """Hosts, what each injects and where, by secret name only."""
    cfg = loaded.config
    policy = build_policy(cfg)
    hosts = []
    for rule in policy.rules:
        hosts.append(
            {
                "host": rule.pattern.text,
                "kind": rule.pattern.kind.name.lower(),
                "allow": rule.allow,
                "injects": [
                    {"secret": s, "location": h.location} for h in rule.headers for s in h.secrets
                ],
                "deny": [d.text for d in rule.deny],
                "intercept": rule.needs_interception,
            }
        )
    return {
        "config": str(loaded.path),
        "default": cfg.egress.default,
        "hosts": hosts,
        "secrets": {name: _source_kind(src) for name, src in cfg.secrets.items()},
        "placeholders": {env: ph.secret for env, ph in cfg.placeholders.items()},
        "services": {
            n: {"listen": s.listen, "upstream": s.upstream} for n, s in cfg.services.items()
        },
    }


def _source_kind(src: Any) -> str:
    for kind in ("env", "file", "command"):
        if hasattr(src, kind):
            value = getattr(src, kind)
            return f"{kind} {' '.join(value) if isinstance(value, list) else value}"
    return f"oauth {src.oauth.grant} via {src.oauth.token_url}"


def cmd_check(args: argparse.Namespace) -> int:
    # A short-lived command that keeps all it builds: no cycle collection (see gc_paused).
    with gc_paused():
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    loaded = load_from_args(args)
    if not args.skip_secrets:
        from gateway.credentials.sources import load_secrets

        with explained_secret_errors(loaded):
            load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)
    info = describe(loaded)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from gateway.cli.console import console as make_console
    from gateway.cli.console import is_large
    from gateway.cli.console import table as make_table

    large = is_large(len(info["hosts"]))
    table = make_table(f"{info['config']}: default {info['default']}", plain=large)
    for col in ("host", "decision", "injects", "denied paths"):
        table.add_column(col)
    for h in info["hosts"]:
        injects = ", ".join(f"{i['secret']} -> {i['location']}" for i in h["injects"]) or "-"
        table.add_row(
            h["host"], "allow" if h["allow"] else "deny", injects, ", ".join(h["deny"]) or "-"
        )
    console = make_console(plain=large)
    console.print(table)
    if info["secrets"]:
        console.print("secrets: " + ", ".join(f"{n} ({k})" for n, k in info["secrets"].items()))
    if not args.skip_secrets:
        console.print("config OK; every secret resolved")
    else:
        console.print("config OK (secrets not resolved)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="write a commented starter keyward.yaml")
    p.add_argument("path", nargs="?", default="keyward.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check", help="validate the config; show hosts and what each injects")
    add_config_option(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--skip-secrets", action="store_true", help="do not resolve secret sources (names only)"
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("schema", help="print the JSON Schema of keyward.yaml")
    p.set_defaults(func=cmd_schema)
