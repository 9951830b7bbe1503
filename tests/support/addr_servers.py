"""Test servers for the private-address guard: a DNS server whose answers the test scripts
(including a rebinding name that answers differently on each query), and HTTP listeners that
record every connection they accept (a recorder on a private address must never see one).

In-process (`ZoneServer`, `Recorder`) for loopback tests, or run as a script inside a
namespace the test created (`python tests/support/addr_servers.py --dir D ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from gateway.dns.resolver import MALFORMED

# name -> qtype ("A"/"AAAA") -> answer sets: the n-th query gets the n-th set, the last repeats.
Zone = dict[str, dict[str, list[list[str]]]]


@dataclass
class ZoneServer:
    """DNS on UDP and TCP; answers names in `zone` with TTL 0 (nothing may cache them),
    NXDOMAIN for anything else, and counts the queries per (name, type)."""

    zone: Zone
    host: str = "127.0.0.1"
    port: int = 0
    queries: dict[tuple[str, str], int] = field(default_factory=dict)
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    def answer(self, data: bytes) -> bytes | None:
        try:
            msg = dns.message.from_wire(data)
        except MALFORMED:
            return None
        if msg.flags & dns.flags.QR or len(msg.question) != 1:
            return None
        q = msg.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(q.rdtype)
        n = self.queries.get((name, qtype), 0)
        self.queries[(name, qtype)] = n + 1
        reply = dns.message.make_response(msg)
        if name not in self.zone:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply.to_wire()
        sets = self.zone[name].get(qtype) or [[]]
        addrs = sets[min(n, len(sets) - 1)]
        if addrs:
            reply.answer.append(
                dns.rrset.from_text_list(q.name, 0, dns.rdataclass.IN, q.rdtype, addrs)
            )
        return reply.to_wire()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server.answer(data)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        # An ephemeral UDP port's number may be taken for TCP (by any outgoing connection's
        # local port): try another rather than fail the test's setup.
        for _ in range(20 if self.port == 0 else 1):
            udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))
            port: int = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return port
        raise OSError(f"no port free for both UDP and TCP on {self.host}")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            reply = self.answer(await reader.readexactly(size))
            if reply is not None:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


@dataclass
class Recorder:
    """A plain HTTP listener that records every connection it accepts and answers `label`."""

    label: str
    host: str = "127.0.0.1"
    port: int = 0
    log: Path | None = None
    connects: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.connects.append(str(peer[0]))
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(json.dumps({"label": self.label, "peer": peer[0]}) + "\n")
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            await reader.readuntil(b"\r\n\r\n")
            body = self.label.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--dns", required=True, help="ip:port to answer DNS on")
    ap.add_argument("--zone", type=Path, required=True, help="JSON Zone")
    ap.add_argument("--http", action="append", default=[], help="label=ip:port")
    args = ap.parse_args()
    log = args.dir / "connects.jsonl"
    host, port = _hostport(args.dns)
    dns = ZoneServer(json.loads(args.zone.read_text()), host, port)
    await dns.start()
    for spec in args.http:
        label, _, where = spec.partition("=")
        h, p = _hostport(where)
        await Recorder(label, h, p, log).start()
    (args.dir / "ready").write_text("ready\n")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
