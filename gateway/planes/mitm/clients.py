"""Agent connections on the mitm plane: `limits.max_connections*` (counted with the service
plane, `GatewayContext.connections`) and `timeouts.request_headers`.

A connection over a limit is not turned away blind: its first request (the CONNECT of an
explicit proxy, or the first request of a transparent connection, inside TLS if it speaks TLS)
gets a 503 `connection-limit` JSON answer, and the connection is closed. Nothing is dialled for
it. Raw TCP over the limit is closed. Each such connection is audited once. While many are
waiting for their answer, more are closed at once (`MAX_WAITING_REFUSALS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http, tcp, tls
from mitmproxy import ctx as mitm_ctx

from gateway.planes.context import GatewayContext
from gateway.planes.resources import MAX_WAITING_REFUSALS
from gateway.policy.core import Decision, Plane, RequestFacts, Verdict
from gateway.policy.refusal import unavailable
from gateway.reasons import Reason

log = logging.getLogger("keyward.mitm")


@dataclass
class _Refused:
    why: str
    started: float
    audited: bool = False


class ConnectionLimit:
    """Counts every agent connection; answers those over a limit with a 503 and closes them."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.admitted: dict[str, str] = {}  # client id -> the address it was counted under
        self.refused: dict[str, _Refused] = {}

    def over_limit(self, client: connection.Client) -> bool:
        return client.id in self.refused

    def client_connected(self, client: connection.Client) -> None:
        address = client.peername[0] if client.peername else "?"
        why = self.ctx.connections.admit(address)
        if why is None:
            self.admitted[client.id] = address
            return
        refused = _Refused(why, time.monotonic())
        if len(self.refused) >= MAX_WAITING_REFUSALS:
            client.error = f"keyward: {why}"  # mitmproxy closes it before reading a byte
            self._record(client, refused, "TCP", "tcp", ("unknown", 0), None)
            return
        self.refused[client.id] = refused

    def client_disconnected(self, client: connection.Client) -> None:
        address = self.admitted.pop(client.id, None)
        if address is not None:
            self.ctx.connections.release(address)
        refused = self.refused.pop(client.id, None)
        if refused is not None and not refused.audited:  # closed before any request
            self._record(client, refused, "TCP", "tcp", ("unknown", 0), None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._answer(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._answer(flow)

    def _answer(self, flow: http.HTTPFlow) -> None:
        refused = self.refused.get(flow.client_conn.id)
        if refused is None:
            return
        r = unavailable(Reason.CONNECTION_LIMIT, refused.why)
        headers = {"Content-Type": r.content_type, **dict(r.headers)}
        if not (flow.request.is_http2 or flow.request.is_http3):
            headers["Connection"] = "close"
        flow.response = http.Response.make(r.status, r.body, headers)  # audited here, not by
        # the audit addon: no other addon gives this flow facts or a decision
        req = flow.request
        scheme = "tcp" if req.method == "CONNECT" else req.scheme
        self._record(flow.client_conn, refused, req.method, scheme, (req.host, req.port), req.path)

    def _record(
        self,
        client: connection.Client,
        refused: _Refused,
        method: str,
        scheme: str,
        target: tuple[str, int],
        path: str | None,
    ) -> None:
        refused.audited = True
        host, port = client.peername[:2] if client.peername else ("?", 0)
        facts = RequestFacts(
            Plane.MITM,
            method,
            scheme,
            target[0],
            target[1],
            path=path if path is not None and method != "CONNECT" else "",
            client=f"{host}:{port}",
        )
        decision = Decision(Verdict.DENY, None, Reason.CONNECTION_LIMIT, status=503)
        status = 503 if path is not None else None
        self.ctx.record(facts, decision, started=refused.started, status=status, error=refused.why)


@dataclass
class _Clock:
    client: connection.Client
    started: float
    timer: asyncio.TimerHandle | None = None
    live: int = 0  # requests between their headers and their end
    requests: int = 0  # request heads received
    http: bool = True  # False once passed through (TLS) or relayed as raw TCP


class RequestHeadersTimeout:
    """`timeouts.request_headers`: a connection must deliver complete request headers within
    that many seconds of its start, of its CONNECT, or of the end of its previous response
    (HTTP/2: of the end of its last live stream). A client dripping its headers a byte at a
    time never reaches a hook, and mitmproxy's own bound is 600 s of silence, which any byte
    resets. When the clock runs out with no request in progress, the connection is closed:
    audited (`client-headers-timeout`) and logged if no request ever came on it; a keep-alive
    connection idle after its requests is closed quietly, as servers do."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.clocks: dict[str, _Clock] = {}

    def _arm(self, clock: _Clock) -> None:
        self._disarm(clock)
        loop = asyncio.get_running_loop()
        seconds = self.ctx.config.config.timeouts.request_headers  # a reload applies here
        clock.timer = loop.call_later(seconds, self._expire, clock)

    @staticmethod
    def _disarm(clock: _Clock) -> None:
        if clock.timer is not None:
            clock.timer.cancel()
            clock.timer = None

    def client_connected(self, client: connection.Client) -> None:
        if client.error:  # closed at once (over the connection limit)
            return
        clock = self.clocks[client.id] = _Clock(client, time.monotonic())
        self._arm(clock)

    def client_disconnected(self, client: connection.Client) -> None:
        clock = self.clocks.pop(client.id, None)
        if clock is not None:
            self._disarm(clock)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        clock = self.clocks.get(flow.client_conn.id)
        if clock is not None:
            self._arm(clock)  # a fresh bound for the handshake and first request inside

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        clock = self.clocks.get(flow.client_conn.id)
        if clock is None or flow.request.method == "CONNECT":
            return
        clock.live += 1
        clock.requests += 1
        self._disarm(clock)

    def _ended(self, flow: http.HTTPFlow) -> None:
        clock = self.clocks.get(flow.client_conn.id)
        if clock is None or flow.request.method == "CONNECT":
            return
        clock.live = max(0, clock.live - 1)
        if clock.live == 0 and clock.http:  # every stream of an HTTP/2 connection is done
            self._arm(clock)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._ended(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.ignore_connection:  # passed through: not HTTP we can see
            self._not_http(data.context.client)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._not_http(flow.client_conn)

    def _not_http(self, client: connection.Client) -> None:
        clock = self.clocks.get(client.id)
        if clock is not None:
            clock.http = False
            self._disarm(clock)

    def _expire(self, clock: _Clock) -> None:
        clock.timer = None
        if clock.live or not clock.http or self.clocks.get(clock.client.id) is not clock:
            return
        ps: Any = mitm_ctx.master.addons.get("proxyserver")
        handler = ps.connections.get(clock.client.id) if ps is not None else None
        if handler is None:
            return
        handler.close_connection(handler.client)
        if clock.requests:
            return  # an idle keep-alive connection
        seconds = self.ctx.config.config.timeouts.request_headers
        why = f"no complete request headers within timeouts.request_headers ({seconds:g} s)"
        peer = clock.client.peername
        host, port = peer[:2] if peer else ("?", 0)
        log.warning("closed the connection from %s:%s: %s", host, port, why)
        facts = RequestFacts(
            Plane.MITM, "HTTP", "http", "unknown", 0, path="", client=f"{host}:{port}"
        )
        decision = Decision(Verdict.DENY, None, Reason.CLIENT_HEADERS_TIMEOUT, status=408)
        self.ctx.record(facts, decision, started=clock.started, error=why)
