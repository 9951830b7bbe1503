"""`timeouts:` on the mitm plane. mitmproxy itself bounds only inactivity of a whole client
connection (600 s) and never a connect, a handshake or a wait for response headers.

- connect: the task opening the upstream connection is cancelled after `connect` seconds;
- tls: an upstream TLS handshake is cut after `tls` seconds (mitm may shake hands upstream
  before the agent's first request, to offer the agent the upstream's protocol: no request's
  clock runs then);
- tls + response_headers: from the request's headers (or the end of its body) to the response
  headers, at most `connect + tls + response_headers` seconds;
- idle: no byte of a request or response body for `idle` seconds.
A timeout closes the upstream connection; the error hook then audits `upstream-timeout` and the
agent gets a 504 (or, once response headers are out, an unterminated body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy import ctx as mitm_ctx
from mitmproxy.proxy import server_hooks

from gateway.config.model import TimeoutsConfig
from gateway.planes.mitm.state import state


class Timeouts:
    def __init__(self, timeouts: Callable[[], TimeoutsConfig]) -> None:
        self.timeouts = timeouts  # read per request: a reload applies to new requests
        self._connecting: dict[str, asyncio.TimerHandle] = {}
        self._handshaking: dict[str, asyncio.TimerHandle] = {}
        # server id -> client id of upstream handshakes cut by `tls`: the agent's request on
        # that connection fails later, and is a timeout too (kept until the agent leaves)
        self._cut_handshakes: dict[str, str] = {}
        self.timed_out_servers: set[str] = set()

    # -- connecting ----------------------------------------------------------------------
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.error:  # refused by the destination gate
            return
        task = asyncio.current_task()  # the task opening this connection
        if task is None:
            return
        sid = data.server.id

        def expire() -> None:
            self.timed_out_servers.add(sid)
            task.cancel()

        loop = asyncio.get_running_loop()
        self._connecting[sid] = loop.call_later(self.timeouts().connect, expire)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        timer = self._connecting.pop(data.server.id, None)
        if timer is not None:
            timer.cancel()

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)
        self._handshake_done(data.server.id)
        if data.server.id not in self._cut_handshakes:
            self.timed_out_servers.discard(data.server.id)

    def client_disconnected(self, client: connection.Client) -> None:
        for sid in [s for s, c in self._cut_handshakes.items() if c == client.id]:
            del self._cut_handshakes[sid]
            self.timed_out_servers.discard(sid)

    # -- the upstream TLS handshake ------------------------------------------------------
    def tls_start_server(self, data: tls.TlsData) -> None:
        server, client_id = data.conn, data.context.client.id
        assert isinstance(server, connection.Server)

        def expire() -> None:
            self._handshaking.pop(server.id, None)
            self.timed_out_servers.add(server.id)
            self._cut_handshakes[server.id] = client_id
            self._close(client_id, server)

        self._handshake_done(server.id)
        loop = asyncio.get_running_loop()
        self._handshaking[server.id] = loop.call_later(self.timeouts().tls, expire)

    def tls_established_server(self, data: tls.TlsData) -> None:
        self._handshake_done(data.conn.id)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._handshake_done(data.conn.id)

    def _handshake_done(self, server_id: str) -> None:
        timer = self._handshaking.pop(server_id, None)
        if timer is not None:
            timer.cancel()

    @staticmethod
    def _close(client_id: str, server: connection.Server) -> None:
        """Close an upstream connection of a live agent connection: mitmproxy then errors
        what waits on it (the flow, or the handshake the agent's handshake waits for)."""
        ps: Any = mitm_ctx.master.addons.get("proxyserver")
        handler = ps.connections.get(client_id) if ps is not None else None
        if handler is None:
            return
        transport = handler.transports.get(server)
        if transport is not None and transport.handler is not None:
            handler.close_connection(server)

    # -- waiting for the response --------------------------------------------------------
    def _arm(self, flow: http.HTTPFlow, seconds: float) -> None:
        """Expire `seconds` from now. Per body chunk this only moves the deadline: an armed
        timer that fires before it arms itself again for the rest (`_expire`)."""
        st = state(flow)
        loop = asyncio.get_running_loop()
        st.deadline = loop.time() + seconds
        if st.timer is None or st.deadline < st.timer.when():
            if st.timer is not None:
                st.timer.cancel()
            st.timer = loop.call_at(st.deadline, self._expire, flow)

    @staticmethod
    def _disarm(flow: http.HTTPFlow) -> None:
        st = state(flow)
        timer, st.timer = st.timer, None
        if timer is not None:
            timer.cancel()

    def _expire(self, flow: http.HTTPFlow) -> None:
        """Close the upstream connection: mitmproxy then errors the flow (504 via the error
        hook) or, mid-body, ends the response unterminated."""
        st = state(flow)
        loop = asyncio.get_running_loop()
        if loop.time() < st.deadline:  # moved since the timer was armed
            st.timer = loop.call_at(st.deadline, self._expire, flow)
            return
        st.timed_out = True
        st.timer = None
        self.timed_out_servers.add(flow.server_conn.id)
        self._close(flow.client_conn.id, flow.server_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        t = self.timeouts()
        waiting = t.connect + t.tls + t.response_headers
        self._arm(flow, waiting)
        inner = flow.request.stream

        def watch(chunk: bytes) -> Iterable[bytes] | bytes:
            # a body resets the clock per chunk (idle); its end starts the wait for headers
            self._arm(flow, waiting if not chunk else t.connect + t.tls + t.idle)
            return inner(chunk) if callable(inner) else chunk

        if callable(inner):
            flow.request.stream = watch

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if state(flow).timer is None:
            return
        idle = self.timeouts().idle
        self._arm(flow, idle)
        resp = flow.response
        inner = resp.stream if resp is not None else None
        if resp is None or not callable(inner):
            return

        def watch(chunk: bytes) -> Iterable[bytes] | bytes:
            if chunk:
                self._arm(flow, idle)
            else:
                self._disarm(flow)
            return inner(chunk)

        resp.stream = watch

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._disarm(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)  # a WebSocket's idle time is the agent's business

    def error(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)
        if flow.server_conn.id in self.timed_out_servers:
            state(flow).timed_out = True
