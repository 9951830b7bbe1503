"""Errors that end a command with one clear line and a documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class KeywardError(Exception):
    """A failure the user can act on; printed as one line, no traceback unless --debug."""

    exit_code = EXIT_FAILURE


class UsageError(KeywardError):
    """Bad arguments or a bad config file."""

    exit_code = EXIT_USAGE
