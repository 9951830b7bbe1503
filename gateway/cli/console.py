"""The one console for every command's tables and status lines.

rich is optional (the `cli` extra): the headless sidecar image goes without it, and a command
run there prints the same tables as plain aligned text. Piped output is 200 columns wide, not
rich's default 80, so tables written to a file or a pipe keep their rows whole."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from typing import IO, Literal, Protocol

PIPED_WIDTH = 200
# The only markup the commands write: a style, or the end of one.
_MARKUP = re.compile(r"\[/?(?:bold|red|green|yellow)?\]")


class Status(Protocol):
    def update(self, status: str) -> None: ...


class Table(Protocol):
    def add_column(
        self, header: str = "", *, justify: Literal["left", "right"] = ..., style: str = ...
    ) -> None: ...

    def add_row(self, *cells: str) -> None: ...


class Console(Protocol):
    def print(
        self, obj: object, /, *, highlight: bool | None = ..., markup: bool | None = ...
    ) -> None: ...

    def status(self, status: str) -> contextlib.AbstractContextManager[Status]: ...


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


# rich lays a table out at about a millisecond a row (every cell measured, wrapped, padded):
# `check` on a 200,000-host config spent minutes there. Past this many rows, plain text.
RICH_MAX_ROWS = 1000


def console(stderr: bool = False, *, plain: bool = False) -> Console:
    """`plain`: plain text even with rich installed (for `table(..., rows=N)` past the bound)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPED_WIDTH
    if _rich_available() and not plain:
        from rich.console import Console as RichConsole

        return RichConsole(stderr=stderr, width=width)
    return PlainConsole(stream, width or PIPED_WIDTH)


def is_large(rows: int) -> bool:
    """Whether a table of `rows` rows is printed as plain text (see RICH_MAX_ROWS)."""
    return rows > RICH_MAX_ROWS


def table(title: str, *, show_header: bool = True, plain: bool = False) -> Table:
    if _rich_available() and not plain:
        from rich.table import Table as RichTable

        return RichTable(title=title, title_justify="left", show_header=show_header)
    return PlainTable(title, show_header)


def plain(text: str) -> str:
    """`text` without the style markup the commands write."""
    return _MARKUP.sub("", text) if "[" in text else text


class PlainTable:
    """Columns padded to their widest cell, under a title line."""

    def __init__(self, title: str, show_header: bool = True) -> None:
        self.title = title
        self.show_header = show_header
        self.headers: list[str] = []
        self.right: list[bool] = []
        self.rows: list[tuple[str, ...]] = []

    def add_column(
        self, header: str = "", *, justify: Literal["left", "right"] = "left", style: str = ""
    ) -> None:
        self.headers.append(header)
        self.right.append(justify == "right")

    def add_row(self, *cells: str) -> None:
        self.rows.append(tuple(plain(c) for c in cells))

    def lines(self) -> Iterator[str]:
        rows = ([tuple(self.headers)] if self.show_header else []) + self.rows
        widths = [
            max((len(r[i]) for r in rows if i < len(r)), default=0)
            for i in range(len(self.headers))
        ]
        yield self.title
        for row in rows:
            cells = (
                c.rjust(widths[i]) if self.right[i] else c.ljust(widths[i])
                for i, c in enumerate(row)
            )
            yield "  ".join(cells).rstrip()


class _PlainStatus:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def update(self, status: str) -> None:
        self._stream.write(f"{plain(status)}\n")


class PlainConsole:
    """What the commands use of rich's Console, as plain text."""

    def __init__(self, stream: IO[str], width: int = PIPED_WIDTH) -> None:
        self._stream = stream
        self.width = width

    def print(
        self, obj: object, /, *, highlight: bool | None = None, markup: bool | None = None
    ) -> None:
        lines = obj.lines() if isinstance(obj, PlainTable) else [plain(str(obj))]
        for line in lines:
            self._stream.write(f"{line}\n")

    @contextlib.contextmanager
    def status(self, status: str) -> Iterator[Status]:
        shown = _PlainStatus(self._stream)
        shown.update(f"{status}...")
        yield shown
