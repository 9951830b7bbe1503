"""The local side of `keyward exec -i -t`: stdin as an async stream, raw mode, window size.

Stdin is read by a daemon thread (it works for pipes, files and terminals alike, and a read
that never returns cannot hold up the exit once the remote process is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

_CHUNK = 65536


async def read_stdin(fd: int | None = None) -> AsyncIterator[bytes]:
    """Chunks of stdin as they arrive; ends at EOF."""
    fd = sys.stdin.fileno() if fd is None else fd
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def pump() -> None:
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except OSError:
                data = b""
            fut = asyncio.run_coroutine_threadsafe(queue.put(data), loop)
            try:
                fut.result()
            except (RuntimeError, asyncio.CancelledError, Exception):
                return  # the loop is gone
            if not data:
                return

    threading.Thread(target=pump, name="keyward-stdin", daemon=True).start()
    while True:
        data = await queue.get()
        if not data:
            return
        yield data


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on a local terminal for the duration (keys go to the remote shell as typed)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int]:
    """(rows, columns) of the terminal itself (not $LINES/$COLUMNS, which do not follow a
    resize)."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(stream.fileno())
            return size.lines, size.columns
    fallback = shutil.get_terminal_size()
    return fallback.lines, fallback.columns


@contextlib.contextmanager
def on_resize(resize: Callable[[int, int], Awaitable[None]]) -> Iterator[None]:
    """Call `resize(rows, cols)` on every SIGWINCH while inside the block."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def fire() -> None:
        task = loop.create_task(quietly(resize(*terminal_size())))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGWINCH, fire)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def quietly(aw: Awaitable[None]) -> None:
    """Await a best-effort call (a resize the engine may refuse once the process is gone)."""
    with contextlib.suppress(Exception):
        await aw
