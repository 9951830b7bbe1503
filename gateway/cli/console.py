"""One rich console for every command's tables: full width when piped, not 80 columns."""

from __future__ import annotations

import sys

from rich.console import Console

PIPED_WIDTH = 200


def console() -> Console:
    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
