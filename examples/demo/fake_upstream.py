"""A stand-in for a real API, for the offline demo: HTTPS on 127.0.0.1 with its own test CA.

It echoes the request back (headers included), like the echo servers that leaked keys to agents
through other gateways. Writes its CA to DIR/upstream-ca.pem and its port to DIR/port.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.pki import make_ca
from tests.support.upstream import Upstream


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, type=Path)
    args = ap.parse_args()
    ca = make_ca(args.dir)
    ca.path.replace(args.dir / "upstream-ca.pem")
    ssl_ctx = ca.server_context(args.dir, "api.demo.test", "blocked.demo.test")
    upstream = await Upstream.start(ssl_ctx)
    (args.dir / "port").write_text(str(upstream.port))
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.close()


if __name__ == "__main__":
    asyncio.run(main())
