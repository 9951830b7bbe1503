"""The gateway under test, in a process of its own: what `keyward run` starts in-process (the
embedded gateway: mitm plane as an explicit proxy plus the aiohttp service plane), without a
child command.

Prints one JSON line `{"pid": PID, "proxy": PORT, "services": {NAME: PORT},
"ca": CA_CERT_PATH}` when both planes
listen, then serves until SIGTERM or until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from gateway.config.loader import load_config
from gateway.runtime.assemble import build_context
from gateway.runtime.embedded import EmbeddedGateway


async def serve(config: Path, state: Path, audit: str) -> None:
    ctx = build_context(load_config(config), state, audit_path=audit, agent="bench")
    gw = EmbeddedGateway(ctx)
    await gw.start()
    assert gw.mitm is not None
    ready = {
        "pid": os.getpid(),
        "proxy": gw.mitm.addresses[0][1],
        "services": gw.service_ports,
        "ca": str(ctx.ca.cert_path),
    }
    print(json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    fd = sys.stdin.fileno()
    loop.add_reader(fd, lambda: None if os.read(fd, 4096) else stop.set())
    try:
        await stop.wait()
    finally:
        loop.remove_reader(fd)
        await gw.close()
        ctx.audit.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--audit", required=True)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    args = ap.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    asyncio.run(serve(args.config, args.state, args.audit))


if __name__ == "__main__":
    main()
