"""keyward's own answer where mitmproxy would write its HTML error page.

mitmproxy builds that page in its protocol layers (`_http1.make_error_response` for HTTP/1,
`Http2Server` for HTTP/2), after the `error` hook and from the same task. The page shows
mitmproxy's message, which names internal addresses (the `upstream.resolve` target). The
`error` hook (`Audit.error`) decides the status and reason it audits and leaves them in
`ERROR_PAGE`; the layer then builds the page from it: a JSON body and `X-Keyward-Reason`, like
every other refusal. With no decision (an error outside any flow) the reason is classified from
the message, which is never echoed.
"""

from __future__ import annotations

import contextvars

from mitmproxy import http
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy.events import Event
from mitmproxy.proxy.layer import CommandGenerator
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.proxy.layers.http._events import (
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

from gateway.planes.common import error_body, error_headers, error_status
from gateway.reasons import AnyReason, Reason

# (status, reason) decided by the error hook for the page built right after it.
ERROR_PAGE: contextvars.ContextVar[tuple[int, AnyReason] | None] = contextvars.ContextVar(
    "keyward_error_page", default=None
)


def error_reason(msg: str) -> Reason:
    """A short, stable reason for a mitmproxy error message."""
    low = msg.lower()
    if "client disconnected" in low or "client closed" in low:
        return Reason.CLIENT_ABORTED
    if "timed out" in low or "timeout" in low or "connection cancelled" in low:
        return Reason.UPSTREAM_TIMEOUT
    if "certificate" in low or "tls" in low or "ssl" in low:
        return Reason.UPSTREAM_TLS_ERROR
    if low.startswith("request") or "bad request" in low or "invalid" in low:
        return Reason.BAD_REQUEST
    return Reason.UPSTREAM_ERROR


def _decided(code: int, message: str) -> tuple[int, AnyReason]:
    page = ERROR_PAGE.get()
    if page is not None:
        ERROR_PAGE.set(None)
        return page
    reason = error_reason(message)
    return (error_status(reason, code) if code >= 500 else code), reason


def _make_error_response(status_code: int, message: str = "") -> bytes:
    status, reason = _decided(status_code, message)
    resp = http.Response.make(
        status, error_body(reason), {**error_headers(reason), "Connection": "close"}
    )
    raw: bytes = http1.assemble_response(resp)
    return raw


def _format_error(status_code: int, message: str) -> bytes:
    # `_h2_error_page` writes HTTP/2 pages itself; should mitmproxy write one, the body is ours.
    return error_body(_decided(status_code, message)[1])


_h2_server_event = _http2.Http2Server._handle_event


def _h2_error_page(self: _http2.Http2Server, event: Event) -> CommandGenerator[None]:
    """An HTTP/2 agent's error page, as a whole response of ours (status, `X-Keyward-Reason`,
    JSON body) written by mitmproxy's own response path: its page has the status it was given
    (502 even for a timeout), `text/html` and no reason header. Where mitmproxy would not write
    a page (stream closed, headers already out, a killed flow) it resets the stream as before."""
    if not isinstance(event, ResponseProtocolError) or not _h2_page_possible(self, event):
        return (yield from _h2_server_event(self, event))
    status, reason = _decided(event.code, event.message)
    body = error_body(reason)
    resp = http.Response.make(status, body, error_headers(reason))
    sid = event.stream_id
    yield from _h2_server_event(self, ResponseHeaders(sid, resp, end_stream=False))
    yield from _h2_server_event(self, ResponseData(sid, body))
    yield from _h2_server_event(self, ResponseEndOfMessage(sid))


def _h2_page_possible(conn: _http2.Http2Server, event: ResponseProtocolError) -> bool:
    stream = conn.h2_conn.streams.get(event.stream_id)
    return (
        stream is not None
        and conn.is_open_for_us(event.stream_id)
        and not stream.state_machine.headers_sent
        and event.code != status_codes.NO_RESPONSE
    )


def install() -> None:
    """Replace mitmproxy's error pages (idempotent; both HTTP versions)."""
    _http1.make_error_response = _make_error_response
    _http2.Http2Server._handle_event = _h2_error_page  # type: ignore[method-assign]
    # _http2 imports format_error from _base and calls it by that imported name: patch it there.
    _http2.format_error = _format_error  # type: ignore[attr-defined]
