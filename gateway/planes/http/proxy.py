"""The aiohttp data plane: plain HTTP in from the agent, pooled verified HTTPS out.

Its front door is the service apps ("base URL" mode): `http://127.0.0.1:<listen>/v1/...` ->
`service.upstream/v1/...`. Transparent plain HTTP goes through the mitm plane, which names a
connection with the one transparent verifier, `planes.transparent`.

Every request decides through the policy core before any secret is touched, streams both
bodies (nothing waits for the end of a body), scrubs real secret values out of the response,
and writes exactly one audit record, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config.model import LimitsConfig, ServiceConfig
from gateway.errors import AddressRefused, ScrubError, UnscrubbableEncoding
from gateway.planes.common import error_body, error_headers, error_status
from gateway.planes.context import GatewayContext
from gateway.planes.http.hop import strip_hop_by_hop
from gateway.planes.outbound import (
    Rejection,
    authority,
    check_limits,
    outbound_headers,
)
from gateway.planes.resources import MAX_WAITING_REFUSALS
from gateway.planes.scrub import (
    ScrubbedHead,
    scrub_head,
    standard_reason,
    upstream_request_headers,
)
from gateway.policy.apply import BodySwapper, apply_plan, no_secret, swap_in_target
from gateway.policy.core import Decision, Plane, RequestFacts, Verdict
from gateway.policy.hosts import is_ip, normalise_host
from gateway.policy.methods import NO_SIGNALS, MethodSignals
from gateway.policy.refusal import RefusalMode, refusal, unavailable
from gateway.reasons import AnyReason, Reason
from gateway.upstream.connector import make_connector

log = logging.getLogger("keyward.http")

# Headers aiohttp would otherwise add on its own: the upstream sees what the agent sent.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
NO_BODY_STATUSES = frozenset({204, 304})
# A response with a declared length up to this is read whole, scrubbed once and sent in one
# write with its (new) length; anything larger, unsized or an event stream is streamed.
SMALL_BODY = 64 * 1024
# Which configured service a service app serves (for status pages and logs).
SERVICE_NAME = web.AppKey("keyward.service", str)


@dataclass
class _Exchange:
    """What the audit record of one request needs, filled in as the request progresses."""

    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    reason: AnyReason | None = None
    client_gone: bool = False
    refusal: RefusalMode | None = None
    alert: str | None = None  # e.g. a placeholder left unswapped in the body
    addr: str | None = None  # a refused dial address (private-address)


@dataclass
class _Connection:
    """An agent connection: counted under `address`, or over a limit (`over` says why: each of
    its requests gets the 503); and its clock for `timeouts.request_headers`."""

    handler: web.RequestHandler
    transport: asyncio.Transport
    started: float
    address: str | None = None
    over: str | None = None
    answered: bool = False  # a 503 went out (else the refusal is audited when it closes)
    timer: asyncio.TimerHandle | None = None
    deadline: float = 0.0  # loop time by which the next request's headers must be in
    live: int = 0  # requests in `_exchange`
    requests: int = 0


class _ClientGone(Exception):
    """The agent went away while we were writing to it."""


def deny_response(
    decision: Decision,
    facts: RequestFacts,
    mode: str,
    accept: str | None = None,
    status: int | None = None,
) -> web.Response:
    """The shared refusal (gateway.policy.refusal), as an aiohttp response."""
    r = refusal(decision, facts, mode=mode, accept=accept, status=status)
    resp = web.Response(status=r.status, body=r.body, headers=dict(r.headers))
    resp.headers["Content-Type"] = r.content_type
    return resp


def unavailable_response(reason: AnyReason, detail: str) -> web.Response:
    """The shared 503 for a request turned away for the gateway's state; the connection closes."""
    r = unavailable(reason, detail)
    resp = web.Response(status=r.status, body=r.body, headers=dict(r.headers))
    resp.headers["Content-Type"] = r.content_type
    resp.force_close()
    return resp


def error_response(reason: AnyReason, status: int = 502) -> web.Response:
    return web.Response(status=status, body=error_body(reason), headers=error_headers(reason))


def classify_upstream_error(exc: BaseException) -> Reason:
    """A short, stable reason for an upstream failure (goes into a header and the audit)."""
    if isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)):
        return Reason.UPSTREAM_TLS_ERROR
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Reason.UPSTREAM_DNS_ERROR
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return Reason.UPSTREAM_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Reason.UPSTREAM_CONNECT_ERROR
    return Reason.UPSTREAM_ERROR


def _peer(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "?:0"
    return f"{peer[0]}:{peer[1]}"


def _refuse_unverifiable(request: web.BaseRequest, limits: LimitsConfig) -> Rejection | None:
    """Limits and control bytes, then the target: only origin-form names no other host (this
    plane's destination is fixed by the listener or the original destination)."""
    rejected = check_limits(request.raw_path, request.raw_headers, limits)
    if rejected is None and not request.raw_path.startswith("/"):
        rejected = Rejection(403, Reason.AUTHORITY_MISMATCH)
    return rejected


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpPlane:
    """One pooled client session for the whole process, plus the listeners that use it."""

    def __init__(
        self,
        ctx: GatewayContext,
        *,
        limit: int = 256,
        limit_per_host: int = 64,
        keepalive_timeout: float = 90.0,
    ) -> None:
        self.ctx = ctx
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self.inflight = 0  # requests between their start and their audit record
        self.stopping = False
        self._connections: dict[web.RequestHandler, _Connection] = {}
        self._waiting = 0  # connections over a limit waiting for their 503
        self._timeout: tuple[object, aiohttp.ClientTimeout] | None = None

    @property
    def limits(self) -> LimitsConfig:
        return self.ctx.config.config.limits

    # -- the shared upstream session -----------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running loop; reused for every request."""
        if self._session is None or self._session.closed:
            connector = make_connector(
                self.ctx.dial_addresses,
                self.ctx.upstream_ssl_context(),
                limit=self.limit,
                limit_per_host=self.limit_per_host,
                keepalive_timeout=self.keepalive_timeout,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._client_timeout(),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=SKIP_AUTO_HEADERS,
                trust_env=False,
            )
        return self._session

    def _client_timeout(self) -> aiohttp.ClientTimeout:
        """`timeouts:` for aiohttp: connect, connect + TLS, and idle between body reads (the
        wait for response headers is bounded around the request, see `_forward`)."""
        t = self.ctx.config.config.timeouts
        cached = self._timeout
        if cached is None or cached[0] is not t:  # built once per (re)loaded config
            timeout = aiohttp.ClientTimeout(
                total=None, connect=t.connect + t.tls, sock_connect=t.connect, sock_read=t.idle
            )
            cached = self._timeout = (t, timeout)
        return cached[1]

    # -- front doors ---------------------------------------------------------------------
    def make_service_app(self, name: str, service: ServiceConfig) -> web.Application:
        """Base-URL mode: everything under this listener goes to `service.upstream`."""
        base = URL(service.upstream)
        scheme = base.scheme
        host = normalise_host(base.raw_host or "")
        port = base.port or (443 if scheme == "https" else 80)
        prefix = base.raw_path.rstrip("/")
        origin = f"{scheme}://{_authority(base.raw_host or host, port)}"
        dial_ip = host if is_ip(host) else None

        host_value = authority(base.raw_host or host, port, scheme)

        async def handle(request: web.Request) -> web.StreamResponse:
            target = request.raw_path
            facts = RequestFacts(
                plane=Plane.SERVICE,
                method=request.method,
                scheme=scheme,
                host=host,
                port=port,
                path=prefix + target,
                host_header=None,  # the agent addressed us; the upstream gets its own Host
                client=_peer(request),
                headers=tuple(outbound_headers(request.headers.items(), None)),
                signals=self._signals(request),
            )
            return await self._exchange(
                request,
                facts,
                origin,
                prefix + target,
                host_value=host_value,
                rejected=_refuse_unverifiable(request, self.limits),
                dial_ip=dial_ip,
            )

        app = web.Application()
        app[SERVICE_NAME] = name
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def _signals(self, request: web.BaseRequest) -> MethodSignals:
        """What the core needs to find every method a request could mean (path-rule configs)."""
        if not self.ctx.policy.reads_methods:
            return NO_SIGNALS
        return MethodSignals.from_headers(lambda name: request.headers.getall(name, ()))

    # -- the one forwarding path ---------------------------------------------------------
    async def _exchange(
        self,
        request: web.Request,
        facts: RequestFacts,
        origin: str,
        target: str,
        *,
        host_value: str | None = None,
        decision: Decision | None = None,
        rejected: Rejection | None = None,
        dial_ip: str | None = None,
    ) -> web.StreamResponse:
        """Decide, inject, forward, stream back scrubbed; one audit record in every case.
        A `rejected` request (limits, authority) is audited as a denial, never decided.
        `dial_ip` is the address `origin` names when it is an IP literal."""
        started = time.monotonic()
        self.inflight += 1
        ex = _Exchange()
        over = self._request_started(request)
        if over is not None:
            ex.status, ex.reason, ex.error = 503, Reason.CONNECTION_LIMIT, over
            decision = Decision(Verdict.DENY, None, Reason.CONNECTION_LIMIT, status=503)
        elif rejected is not None:
            decision = Decision(Verdict.DENY, None, rejected.reason, status=rejected.status)
        elif decision is None:
            decision = self.ctx.policy.decide(facts)
        policy = self.ctx.config.digest  # the policy that decided, even if a reload follows
        form: bytes | None = None
        try:
            if over is not None:
                return unavailable_response(Reason.CONNECTION_LIMIT, over)
            if decision.body_limit:  # a bounded form body decides too (`_method`): read it
                try:
                    async with asyncio.timeout(self.ctx.config.config.timeouts.idle):
                        form = await request.read()
                except TimeoutError:
                    ex.reason, ex.error = Reason.CLIENT_IDLE_TIMEOUT, "request body stalled"
                    raise _ClientGone() from None
                ex.bytes_up = len(form)
                facts = dataclasses.replace(
                    facts, signals=dataclasses.replace(facts.signals, body=form)
                )
                decision = self.ctx.policy.decide(facts)
            if not decision.allowed:
                ex.status = decision.status
                if decision.alert:
                    log.warning("placeholder sent to %s: %s", facts.host, decision.reason)
                ex.refusal = self.ctx.refusal_mode
                return deny_response(
                    decision, facts, ex.refusal, request.headers.get("Accept"), ex.status
                )
            if not self.ctx.audit.available():
                # Pre-flight: nothing reaches an upstream while its record could not be written.
                ex.status, ex.reason = 503, Reason.AUDIT_UNAVAILABLE
                return error_response(Reason.AUDIT_UNAVAILABLE, 503)
            if dial_ip is not None:  # aiohttp asks no resolver for an IP literal: check here
                await self.ctx.dial_addresses(facts.host, facts.port, via=(dial_ip, facts.port))
            if decision.target is not None:
                target = decision.target  # the path that was decided goes upstream
            headers = list(facts.headers)
            plan = decision.plan
            resolve: Callable[[str], str] = no_secret
            if plan is not None and (plan.headers or plan.swaps or plan.swappable("body")):
                try:
                    resolve = await self.ctx.resolver_for(decision)
                    headers = apply_plan(decision, headers, resolve)
                    if plan.swaps:
                        target = swap_in_target(decision, target, resolve)
                except Exception as e:  # token endpoint down, stale token: fail closed
                    ex.status = 502
                    ex.reason = Reason.CREDENTIALS_UNAVAILABLE.about(type(e).__name__)
                    ex.error = self.ctx.redactor.redact(str(e))
                    return error_response(ex.reason)
            credentialed = plan is not None and plan.credentialed
            headers = upstream_request_headers(headers, credentialed)
            if host_value:
                headers.insert(0, ("Host", host_value))
            swapper = None
            if self.ctx.policy.placeholders and request.body_exists:
                swapper = BodySwapper(
                    decision,
                    self.ctx.policy.placeholders,
                    resolve,
                    lambda p: setattr(ex, "alert", f"placeholder {p.env} in body"),
                )
            length = request.headers.get("Content-Length")
            if length is not None and request.body_exists and not (swapper and swapper.swaps):
                headers.append(("Content-Length", length))  # else: chunked, the length may change
            body: bytes | AsyncIterator[bytes] | None = None
            if form is not None:  # read whole before deciding: swapped whole
                body = swapper.feed(form) + swapper.flush() if swapper is not None else form
            elif request.body_exists:
                body = self._upload(request, ex, swapper)
            return await self._forward(request, ex, origin + target, headers, body)
        except AddressRefused as e:  # from the check above or the session's resolver
            decision = Decision(
                Verdict.DENY, decision.rule, e.reason, normalised_path=decision.normalised_path
            )
            ex.status, ex.addr, ex.error = 403, e.addr, str(e)
            ex.refusal = self.ctx.refusal_mode
            return deny_response(decision, facts, ex.refusal, request.headers.get("Accept"))
        except (_ClientGone, ConnectionError):
            if request.transport is not None:
                request.transport.close()
            ex.reason = ex.reason or Reason.CLIENT_ABORTED
            ex.error = ex.error or "client disconnected"
            return web.Response(status=499)  # never seen by anyone: the connection is gone
        except asyncio.CancelledError:
            if self.stopping:
                ex.reason = Reason.GATEWAY_STOPPING
                ex.error = "gateway stopping: drain bound reached"
            ex.reason = ex.reason or Reason.CLIENT_ABORTED
            ex.error = ex.error or "client disconnected"
            raise
        finally:
            if ex.alert and not decision.alert:
                decision = dataclasses.replace(
                    decision, alert=True, extra={**decision.extra, "alert": ex.alert}
                )
            self.ctx.record(
                facts,
                decision,
                started=started,
                status=ex.status,
                bytes_up=ex.bytes_up,
                bytes_down=ex.bytes_down,
                error=ex.error,
                reason=ex.reason,
                refusal=ex.refusal,
                policy=policy,
                addr=ex.addr,
            )
            self.inflight -= 1
            self._request_ended(request)

    async def _upload(
        self, request: web.Request, ex: _Exchange, swapper: BodySwapper | None
    ) -> AsyncIterator[bytes]:
        """The agent's body, chunk by chunk as it arrives, counted (placeholders swapped or
        reported by `swapper`)."""
        idle = self.ctx.config.config.timeouts.idle
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):  # a slow-drip upload is bounded too
                        chunk = await request.content.readany()
                except TimeoutError:
                    ex.reason, ex.error = Reason.CLIENT_IDLE_TIMEOUT, "request body stalled"
                    raise
                if not chunk:
                    break
                ex.bytes_up += len(chunk)
                out = swapper.feed(chunk) if swapper is not None else chunk
                if out:
                    yield out
        except Exception:
            ex.client_gone = True
            raise
        if swapper is not None:
            tail = swapper.flush()
            if tail:
                yield tail

    async def _forward(
        self,
        request: web.Request,
        ex: _Exchange,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> web.StreamResponse:
        t = self.ctx.config.config.timeouts
        try:
            # the whole wait for response headers: connect, handshake, request, thinking
            async with asyncio.timeout(t.connect + t.tls + t.response_headers):
                upstream = await self.session.request(
                    request.method,
                    URL(url, encoded=True),
                    headers=CIMultiDict(headers),
                    data=body,
                    allow_redirects=False,
                    compress=None,
                    expect100=False,
                    timeout=self._client_timeout(),
                )
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            if ex.client_gone:
                raise _ClientGone() from e
            ex.reason = classify_upstream_error(e)
            ex.status = error_status(ex.reason)
            ex.error = self.ctx.redactor.redact(f"{type(e).__name__}: {e}")
            return error_response(ex.reason, ex.status)
        try:
            return await self._relay(request, ex, upstream)
        finally:
            upstream.release()

    async def _relay(
        self, request: web.Request, ex: _Exchange, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the upstream response back as it arrives, scrubbed of real secret values in
        every form the agent can decode (gateway.planes.scrub)."""
        ex.status = upstream.status
        redact = self.ctx.redactor.redact
        empty = request.method == "HEAD" or upstream.status in NO_BODY_STATUSES
        try:
            head = scrub_head(strip_hop_by_hop(upstream.headers.items()), self.ctx.redactor)
        except UnscrubbableEncoding:
            ex.status = 502
            ex.reason = Reason.UNSCRUBBABLE_ENCODING
            return error_response(Reason.UNSCRUBBABLE_ENCODING)
        length = upstream.content_length
        if not empty and not head.rewrites_body and length is not None and length <= SMALL_BODY:
            return await self._relay_small(request, ex, upstream, head)
        resp = web.StreamResponse(status=upstream.status, reason=standard_reason(upstream.status))
        # Scrubbing can change a body's length, so the length is ours to frame (chunked).
        for name, value in head.headers:
            if empty or name.lower() != "content-length":
                resp.headers.add(name, value)
        try:
            await resp.prepare(request)
        except ConnectionError as e:
            raise _ClientGone() from e
        if empty:
            return await self._finish(resp, ex)
        body = head.body
        try:
            async for chunk in upstream.content.iter_any():
                for piece in body.feed(chunk) if body is not None else (chunk,):
                    await self._send(resp, ex, piece)
            for piece in body.finish() if body is not None else ():
                await self._send(resp, ex, piece)
        except _ClientGone:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ScrubError) as e:
            # Headers are out: the only honest signal left is an unterminated body.
            if isinstance(e, ScrubError):
                ex.reason = e.reason
            else:
                ex.reason = classify_upstream_error(e)
                ex.error = redact(f"{type(e).__name__}: {e}")
            if request.transport is not None:
                request.transport.close()
            return resp
        # aiohttp's client reads and discards HTTP/1.1 trailers, and its server cannot send
        # any: on this plane trailers never reach the agent.
        return await self._finish(resp, ex)

    async def _relay_small(
        self,
        request: web.Request,
        ex: _Exchange,
        upstream: aiohttp.ClientResponse,
        head: ScrubbedHead,
    ) -> web.StreamResponse:
        """A small sized identity body: one read, one scrub, headers and body in one write (the
        streamed path costs three writes and a chunked frame for the same bytes)."""
        redactor = self.ctx.redactor
        try:
            body = redactor.redact_bytes(await upstream.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            ex.reason = classify_upstream_error(e)
            ex.status = error_status(ex.reason)
            ex.error = redactor.redact(f"{type(e).__name__}: {e}")
            return error_response(ex.reason, ex.status)
        resp = web.Response(
            status=upstream.status, reason=standard_reason(upstream.status), body=body
        )
        for name, value in head.headers:
            if name.lower() != "content-length":
                resp.headers.add(name, value)
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError as e:
            raise _ClientGone() from e
        ex.bytes_down = len(body)
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, ex: _Exchange, data: bytes) -> None:
        if not data:
            return
        try:
            await resp.write(data)
        except ConnectionError as e:
            raise _ClientGone() from e
        ex.bytes_down += len(data)

    @staticmethod
    async def _finish(resp: web.StreamResponse, ex: _Exchange) -> web.StreamResponse:
        try:
            await resp.write_eof()
        except ConnectionError as e:
            raise _ClientGone() from e
        return resp

    # -- agent connections ---------------------------------------------------------------
    def _track_connections(self, server: web.Server) -> None:
        """aiohttp tells its Server of every connection a listener accepts and loses: each is
        counted there against `limits.max_connections*`, and its request-headers clock starts.
        One over a limit is kept and its first request answered 503 (`_exchange`); past
        `MAX_WAITING_REFUSALS` of those it is closed at once; either way audited once."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else "?"
            conn = _Connection(handler, transport, time.monotonic())
            conn.over = self.ctx.connections.admit(address)
            if conn.over is None:
                conn.address = address
            elif self._waiting >= MAX_WAITING_REFUSALS:
                transport.close()
                self._record_connection(conn, Reason.CONNECTION_LIMIT, conn.over)
                return
            else:
                self._waiting += 1
            self._connections[handler] = conn
            self._arm(conn)

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            conn = self._connections.pop(handler, None)
            if conn is None:
                return
            self._disarm(conn)
            if conn.address is not None:
                self.ctx.connections.release(conn.address)
            if conn.over is not None:
                self._waiting -= 1
                if not conn.answered:
                    self._record_connection(conn, Reason.CONNECTION_LIMIT, conn.over)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _arm(self, conn: _Connection) -> None:
        """`timeouts.request_headers` from the connection's start or its last response: a
        client dripping its headers never reaches a handler, and aiohttp bounds it only by its
        own keep-alive timeout, silently. Moving the deadline keeps the timer armed: when it
        fires early, `_expire` arms it again for the rest (no timer per request)."""
        seconds = self.ctx.config.config.timeouts.request_headers
        loop = asyncio.get_running_loop()
        conn.deadline = loop.time() + seconds
        if conn.timer is None or conn.deadline < conn.timer.when():
            self._disarm(conn)
            conn.timer = loop.call_at(conn.deadline, self._expire, conn)

    @staticmethod
    def _disarm(conn: _Connection) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _expire(self, conn: _Connection) -> None:
        """Close a connection with no request in progress; audited if none ever came on it
        (an idle keep-alive connection is closed quietly, as servers do)."""
        conn.timer = None
        if conn.live or self._connections.get(conn.handler) is not conn:
            return  # a request in progress: its end arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < conn.deadline:  # a response since: the deadline moved
            conn.timer = loop.call_at(conn.deadline, self._expire, conn)
            return
        conn.handler.force_close()
        conn.transport.close()
        if conn.requests:
            return
        seconds = self.ctx.config.config.timeouts.request_headers
        why = f"no complete request headers within timeouts.request_headers ({seconds:g} s)"
        conn.answered = True  # its record is this one
        log.warning("closed a service-plane connection: %s", why)
        self._record_connection(conn, Reason.CLIENT_HEADERS_TIMEOUT, why)

    def _request_started(self, request: web.BaseRequest) -> str | None:
        """A request's headers are in: its connection's clock waits for it to end. Returns why
        the connection is over a limit (every request on it is then answered 503), or None."""
        conn = self._connections.get(request.protocol)
        if conn is None:
            return None
        conn.live += 1  # the armed timer finds it live and lets it be
        conn.requests += 1
        if conn.over is not None:
            conn.answered = True
        return conn.over

    def _request_ended(self, request: web.BaseRequest) -> None:
        conn = self._connections.get(request.protocol)
        if conn is not None:
            conn.live = max(0, conn.live - 1)
            if not conn.live:
                self._arm(conn)

    def _record_connection(self, conn: _Connection, reason: Reason, why: str) -> None:
        """The record of a connection closed with no request answered on it."""
        peer = conn.transport.get_extra_info("peername")
        local = conn.transport.get_extra_info("sockname")
        facts = RequestFacts(
            Plane.SERVICE,
            "HTTP",
            "http",
            str(local[0]) if local else "unknown",
            int(local[1]) if local else 0,
            path="",
            client=f"{peer[0]}:{peer[1]}" if peer else "?:0",
        )
        decision = Decision(Verdict.DENY, None, reason, status=503)
        self.ctx.record(facts, decision, started=conn.started, error=why)

    # -- lifecycle -----------------------------------------------------------------------
    async def serve(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen with `app` on host:port (0 = ephemeral); returns the bound port."""
        lim = self.limits
        # aiohttp's own parser caps (a 400 beyond them) sit above ours, so a request just over
        # a limit gets our 414/431 and its reason; ours are checked on every request.
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=2.0,
            max_line_size=2 * max(lim.url_bytes, lim.header_bytes),
            max_field_size=2 * lim.header_bytes,
            max_headers=2 * lim.headers,
        )
        await runner.setup()
        assert runner.server is not None
        self._track_connections(runner.server)
        self._runners.append(runner)
        await web.TCPSite(runner, host, port).start()
        return int(runner.addresses[0][1])

    async def start(self, host: str = "127.0.0.1") -> dict[str, int]:
        """Start every configured service; returns service name -> bound port."""
        ports: dict[str, int] = {}
        for name, service in self.ctx.config.config.services.items():
            app = self.make_service_app(name, service)
            ports[name] = await self.serve(app, host, service.listen)
        return ports

    async def drain(self, seconds: float) -> None:
        """Stop listening; wait up to `seconds` for requests in flight (streams included);
        then `close` cancels the rest, each audited as `gateway-stopping`."""
        for runner in self._runners:
            for site in list(runner.sites):
                with contextlib.suppress(Exception):
                    await site.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.stopping = True

    async def close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
