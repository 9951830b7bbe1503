"""`keyward` command line: each command lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gateway import __version__
from gateway.errors import (
    KeywardError,
    SecretError,
    SecretsError,
    SecretsUnresolved,
    StaleTokenError,
    UsageError,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# The exit status of each error class: the nearest class of an error's MRO found here decides.
# Errors carry no status of their own; this table is the only place one is chosen.
EXIT_CODES: dict[type[KeywardError], int] = {
    StaleTokenError: EXIT_FAILURE,  # a token that ran out is not bad input (a SecretError)
    UsageError: EXIT_USAGE,
    SecretError: EXIT_USAGE,
    SecretsError: EXIT_USAGE,
    SecretsUnresolved: EXIT_USAGE,
    KeywardError: EXIT_FAILURE,
}

# Modules under gateway.cli, each defining register(subparsers). Order = order in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "config_cmds",
    "policy_cmds",
    "run_cmds",
    "log_cmds",
    "serve_cmds",
    "netfilter_cmds",
    "entrypoint_cmds",
    "ca_cmds",
    "engine_cmds",
    "pair_cmds",
    "audit_cmds",
    "doctor_cmds",
    "kube_cmds",
)
EXIT_BROKEN_PIPE = 141
# Which module registers each command, and its one-line help: `keyward --help`, `--version`
# and every command import only what they use (importing all of them took over a second).
# tests/test_cli.py checks this table against what the modules register.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("config_cmds", "write a commented starter keyward.yaml"),
    "check": ("config_cmds", "validate the config; show hosts and what each injects"),
    "schema": ("config_cmds", "print the JSON Schema of keyward.yaml"),
    "policy": ("policy_cmds", "dry-run requests through the policy"),
    "run": ("run_cmds", "run CMD with its traffic through an in-process gateway"),
    "log": ("log_cmds", "read the audit log as a table or a per-host summary"),
    "serve": ("serve_cmds", "run the gateway sidecar of a pod"),
    "reload": ("serve_cmds", "reload config and secrets of a running gateway"),
    "netfilter": ("netfilter_cmds", "render, apply, verify or remove the pod's rules"),
    "entrypoint": ("entrypoint_cmds", "agent-side trust: CA bundle, env file, wrapper"),
    "ca": ("ca_cmds", "the gateway CA (created once; the private key never leaves)"),
    "engine": ("engine_cmds", "which engine socket was found, how, engine kind and API version"),
    "up": ("pair_cmds", "launch a gateway + agent pair through the engine socket"),
    "down": ("pair_cmds", "remove a pair (containers, volumes, networks) by its label"),
    "status": ("pair_cmds", "a pair's containers, readiness, audit counts; exit 3 when degraded"),
    "restart": ("pair_cmds", "restart a pair's member in the order that keeps the agent guarded"),
    "logs": ("pair_cmds", "a pair's gateway or agent logs"),
    "exec": ("pair_cmds", "run a command in a pair's agent (exit code passed on)"),
    "audit": ("audit_cmds", "check a running pair (verify) or a candidate policy (replay)"),
    "doctor": ("doctor_cmds", "check this set-up end to end and print each fix"),
    "kube": ("kube_cmds", "Kubernetes manifests for an agent pod with a keyward sidecar"),
}
# Commands whose trailing arguments belong to another program: `--debug` after their name
# (without a `--`) is that program's.
PASSTHROUGH_COMMANDS = frozenset({"run", "exec"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 already; keep it one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"keyward: error: {message}\n")


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser, with `command`'s module registered; "*" registers every module, None
    none (only the command names and their help, for `keyward --help`)."""
    parser = _Parser(prog="keyward", description="Egress gateway for sandboxed coding agents.")
    parser.add_argument("--version", action="version", version=f"keyward {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show (redacted) tracebacks; accepted anywhere"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    if command is None:
        for name, (_, text) in COMMANDS.items():
            sub.add_parser(name, help=text)
        return parser
    known = COMMANDS.get(command)
    modules = (known[0],) if known and command != "*" else COMMAND_MODULES
    for name in modules:
        importlib.import_module(f"gateway.cli.{name}").register(sub)
    return parser


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Take `--debug` from anywhere on the command line, except where it is CMD's own: after
    `--`, or after the command name of `run`/`exec` when no `--` is given."""
    argv = list(argv)
    command = _command_of(argv)
    stop = argv.index("--") if "--" in argv else len(argv)
    if command in PASSTHROUGH_COMMANDS and "--" not in argv:
        stop = argv.index(command)
    keep = [a for i, a in enumerate(argv) if not (i < stop and a == "--debug")]
    return keep, len(keep) != len(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # the commonest probe: not even argparse's formatter
        print(f"keyward {__version__}")
        return 0
    command = _command_of(argv)
    if command is None and any(a in ("-h", "--help", "--version") for a in argv):
        build_parser(None).parse_args(argv)  # prints and exits without importing any command
    parser = build_parser(command or "*")
    args = parser.parse_args(argv)
    args.debug = debug
    import logging

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="keyward: %(message)s",
        stream=sys.stderr,
    )
    from gateway.credentials.redact import install_logging_filter

    install_logging_filter()  # no secret value reaches a log line
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return rc
    except BrokenPipeError:
        return _reader_went_away()
    except KeywardError as e:
        _report(e, args.debug)
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an unexpected failure still gets one redacted line
        _report(e, args.debug, prefix="" if _engine_error(e) else "internal error: ")
        return EXIT_FAILURE


def exit_code(exc: KeywardError) -> int:
    """The exit status for `exc`: that of the nearest class in its MRO listed in EXIT_CODES."""
    return next((EXIT_CODES[c] for c in type(exc).__mro__ if c in EXIT_CODES), EXIT_FAILURE)


def _engine_error(e: Exception) -> bool:
    """An engine client error (it knows no exit codes); looked up only if the client was loaded,
    so commands that never touch an engine do not import it."""
    errors = sys.modules.get("gateway.engine.errors")
    return errors is not None and isinstance(e, (errors.EngineError, errors.EngineNotFound))


def _reader_went_away() -> int:
    """`keyward ... | head`: the reader closed the pipe. Exit quietly, as a C tool killed by
    SIGPIPE would (128 + 13), and point stdout at /dev/null so the interpreter's final flush
    does not print "Exception ignored ... BrokenPipeError"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _report(exc: BaseException, debug: bool, prefix: str = "") -> None:
    from gateway.credentials.redact import global_redactor

    redact = global_redactor().redact
    if debug:
        import traceback

        text = "".join(traceback.format_exception(exc))
        sys.stderr.write(redact(text))
    sys.stderr.write(redact(f"keyward: {prefix}{exc}") + "\n")
