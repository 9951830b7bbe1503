"""A fake HTTP/2-only upstream (ALPN h2, real TLS) that records every stream it received:
pseudo-headers, headers, body and trailers. It answers each stream with a small JSON echo,
except a path under `/hang`, which it never answers, and one under `/reset`, which it refuses
(RST_STREAM REFUSED_STREAM)."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events


@dataclass
class H2Seen:
    streams: list[dict[str, object]] = field(default_factory=list)
    alpn: list[str | None] = field(default_factory=list)


class _Conn:
    def __init__(self, seen: H2Seen, writer: asyncio.StreamWriter) -> None:
        self.seen = seen
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.pending: dict[int, dict[str, object]] = {}

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.pending[event.stream_id] = {"headers": list(event.headers), "body": b""}
        elif isinstance(event, h2.events.DataReceived):
            rec = self.pending.get(event.stream_id)
            if rec is not None:
                rec["body"] = rec["body"] + event.data  # type: ignore[operator]
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            rec = self.pending.get(event.stream_id)
            if rec is not None:
                rec["trailers"] = [[k, v] for k, v in event.headers]
        elif isinstance(event, h2.events.StreamEnded):
            rec = self.pending.pop(event.stream_id, None)
            if rec is None:
                return
            headers: list[tuple[str, str]] = rec["headers"]  # type: ignore[assignment]
            body: bytes = rec["body"]  # type: ignore[assignment]
            entry = {
                "pseudo": {k: v for k, v in headers if k.startswith(":")},
                "headers": [[k, v] for k, v in headers if not k.startswith(":")],
                "body_len": len(body),
                "trailers": rec.get("trailers", []),
            }
            self.seen.streams.append(entry)
            path = str(entry["pseudo"].get(":path", ""))  # type: ignore[attr-defined]
            if path.startswith("/hang"):
                return
            if path.startswith("/reset"):
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            out = json.dumps(entry).encode()
            self.h2.send_headers(
                event.stream_id,
                [(":status", "200"), ("content-type", "application/json"),
                 ("content-length", str(len(out)))],
            )  # fmt: skip
            self.h2.send_data(event.stream_id, out, end_stream=True)
        elif isinstance(event, h2.events.StreamReset):
            self.pending.pop(event.stream_id, None)


class H2Upstream:
    """`await H2Upstream.start(ssl_ctx)`: `.port`, `.seen`, `await .close()`."""

    def __init__(self, server: asyncio.Server, seen: H2Seen) -> None:
        self.server, self.seen = server, seen
        self.port: int = server.sockets[0].getsockname()[1]

    @classmethod
    async def start(cls, ssl_context: ssl.SSLContext, host: str = "127.0.0.1") -> H2Upstream:
        ssl_context.set_alpn_protocols(["h2"])
        seen = H2Seen()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sslobj = writer.get_extra_info("ssl_object")
            seen.alpn.append(sslobj.selected_alpn_protocol() if sslobj else None)
            conn = _Conn(seen, writer)
            conn.h2.initiate_connection()
            writer.write(conn.h2.data_to_send())
            try:
                while data := await reader.read(65536):
                    for event in conn.h2.receive_data(data):
                        conn.handle(event)
                    writer.write(conn.h2.data_to_send())
                    await writer.drain()
            except (ConnectionError, h2.exceptions.ProtocolError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, host, 0, ssl=ssl_context)
        return cls(server, seen)

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()
