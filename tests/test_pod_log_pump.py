"""`run --isolate` reads its gateway's stderr for the gateway's whole life: an unread pipe
fills at 64 KiB and the gateway, blocked in a log write, stops serving every agent."""

from __future__ import annotations

import io
import subprocess
import sys

from gateway.pod.isolate import LogPump
from tests.support.wait import BOUND

CHATTY = (
    "import sys\n"
    "for i in range(20000):\n"  # about 1 MiB: far past a pipe's 64 KiB
    "    sys.stderr.write(f'warning {i}: client does not trust the proxy certificate\\n')\n"
    "print('done', flush=True)\n"
)


def test_a_chatty_gateway_never_blocks_on_its_log() -> None:
    out = io.StringIO()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHATTY], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None and proc.stdout is not None
    pump = LogPump(proc.stderr, out=out, keep=5)
    pump.forward = True
    try:
        assert proc.wait(BOUND) == 0  # not blocked in a write to a full pipe
        assert proc.stdout.read() == b"done\n"
    finally:
        proc.kill()
        proc.wait()
    tail = pump.text()
    assert tail.splitlines()[-1] == "warning 19999: client does not trust the proxy certificate"
    assert len(tail.splitlines()) == 5  # bounded
    assert out.getvalue().count("\n") == 20000  # forwarded, once ready


def test_start_up_lines_are_kept_not_forwarded() -> None:
    out = io.StringIO()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stderr.write('bad config\\n'); sys.exit(2)"],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    pump = LogPump(proc.stderr, out=out)
    assert proc.wait(BOUND) == 2
    assert pump.text() == "bad config\n"
    assert out.getvalue() == ""
