"""`keyward` command line: each command lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from gateway import __version__
from gateway.cli.errors import EXIT_FAILURE, EXIT_USAGE, KeywardError

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
)

log = logging.getLogger("keyward")
EXIT_BROKEN_PIPE = 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep it one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"keyward: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keyward", description="Egress gateway for sandboxed coding agents.")
    parser.add_argument("--version", action="version", version=f"keyward {__version__}")
    parser.add_argument("--debug", action="store_true", help="show (redacted) tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"gateway.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an unexpected failure still gets one redacted line
        _report(e, args.debug, prefix="internal error: ")
        return EXIT_FAILURE


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
        text = "".join(traceback.format_exception(exc))
        sys.stderr.write(redact(text))
    sys.stderr.write(redact(f"keyward: {prefix}{exc}") + "\n")
