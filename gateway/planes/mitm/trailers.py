"""HTTP/1.1 trailers through mitmproxy's HTTP/1 layer.

mitmproxy (11.x, and 12.x at the time of writing) handles trailers over HTTP/2 but not over
HTTP/1: a chunked body ending in trailer fields raises inside its HTTP/1 reader, and the
response never finishes (gRPC-web and some streaming APIs use trailers). This module teaches the
HTTP/1 connection classes, once per process, to read trailers into the message being read (where
the HTTP layer already looks for them, so addons see and scrub them in the `response` hook) and
to write them in the last chunk of a chunked body. A message that is not chunked cannot carry
trailers: they are dropped. Installed only if the reader still has the limitation, so a
mitmproxy that learns trailers keeps its own code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from typing import Any

import h11
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import (
    RequestEndOfMessage,
    RequestTrailers,
    ResponseEndOfMessage,
    ResponseTrailers,
)

_installed = False


class _TrailerReader:
    """Wraps h11's body reader: an end of message with trailer fields stores them on the
    message being read and becomes a plain end of message."""

    def __init__(self, inner: Any, conn: _http1.Http1Connection) -> None:
        self.inner = inner
        self.conn = conn

    def __call__(self, buf: Any) -> Any:
        return self._take(self.inner(buf))

    def read_eof(self) -> Any:
        return self._take(self.inner.read_eof())

    def _take(self, event: Any) -> Any:
        if isinstance(event, h11.EndOfMessage) and event.headers:
            reading_response = isinstance(self.conn, _http1.Http1Client)
            message = self.conn.response if reading_response else self.conn.request
            if message is not None:
                message.trailers = http.Headers([(bytes(k), bytes(v)) for k, v in event.headers])
            return h11.EndOfMessage()
        return event


def _read_body(original: Callable[..., Generator[Any, Any, None]]) -> Callable[..., Any]:
    def read_body(self: _http1.Http1Connection, event: Any) -> Generator[Any, Any, None]:
        if not isinstance(self.body_reader, _TrailerReader):
            self.body_reader = _TrailerReader(self.body_reader, self)  # type: ignore[assignment]
        yield from original(self, event)

    return read_body


def _send(
    original: Callable[..., Generator[Any, Any, None]],
    trailers_type: type,
    end_type: type,
    response: bool,
) -> Callable[..., Any]:
    def send(self: _http1.Http1Connection, event: Any) -> Generator[Any, Any, None]:
        if isinstance(event, trailers_type):
            self._keyward_trailers = event.trailers  # type: ignore[attr-defined]
            return
        if isinstance(event, end_type):
            trailers = getattr(self, "_keyward_trailers", None)
            self._keyward_trailers = None  # type: ignore[attr-defined]
            message = self.response if response else self.request
            head = self.request is not None and self.request.method.upper() == "HEAD"
            if (
                trailers
                and message is not None
                and not (response and head)
                and "chunked" in message.headers.get("transfer-encoding", "").lower()
            ):
                yield commands.SendData(self.conn, b"0\r\n" + bytes(trailers) + b"\r\n")
                yield from self.mark_done(request=not response, response=response)
                return
        yield from original(self, event)

    return send


def install() -> None:
    """Patch the HTTP/1 classes once, if they still refuse trailers."""
    global _installed
    if _installed:
        return
    _installed = True
    if "trailers are not implemented" not in inspect.getsource(_http1.Http1Connection.read_body):
        return
    conn = _http1.Http1Connection
    conn.read_body = _read_body(conn.read_body)  # type: ignore[method-assign]
    server, client = _http1.Http1Server, _http1.Http1Client
    server.send = _send(server.send, ResponseTrailers, ResponseEndOfMessage, True)  # type: ignore[method-assign]
    client.send = _send(client.send, RequestTrailers, RequestEndOfMessage, False)  # type: ignore[method-assign]
