"""mitmproxy addons, one concern each, all deciding through the one policy core.

Order matters and is fixed by `addon_chain`: the destination gate and the policy gate run
before the injector, so a denied request never reaches code that can read a secret.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, http, tcp, tls, udp, websocket
from mitmproxy.flow import Error
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.proxy.layers.http import HTTPMode

from gateway.errors import AddressRefused, ResolveError, ScrubError, UnscrubbableEncoding
from gateway.planes.common import error_body, error_headers, error_status
from gateway.planes.context import GatewayContext
from gateway.planes.mitm import trailers
from gateway.planes.mitm.clients import ConnectionLimit, RequestHeadersTimeout
from gateway.planes.mitm.drain import Drain
from gateway.planes.mitm.errors import ERROR_PAGE, error_reason
from gateway.planes.mitm.state import ConnState, state
from gateway.planes.mitm.timeouts import Timeouts
from gateway.planes.outbound import (
    Rejection,
    authority,
    check_authority,
    check_limits,
    is_origin_form,
    outbound_headers,
    request_trailers,
)
from gateway.planes.scrub import (
    MessageScrubber,
    scrub_head,
    standard_reason,
    upstream_request_headers,
)
from gateway.policy.apply import (
    BodySwapper,
    apply_plan,
    no_secret,
    swap_in_target,
    swap_placeholders,
)
from gateway.policy.core import ConnectionDecision, Decision, Plane, RequestFacts, Verdict
from gateway.policy.hosts import is_ip, normalise_host
from gateway.policy.methods import NO_SIGNALS, MethodSignals
from gateway.policy.refusal import REASON_HEADER, RefusalMode, refusal
from gateway.reasons import AnyReason, Reason

log = logging.getLogger("keyward.mitm")


# The start of an HTTP/1 request line: a method token, one space.
HTTP_START = re.compile(rb"^[A-Z][A-Z-]{2,19} ")

# Where a transparent connection's name comes from when only an IP was seen (pod mode sets this).
TransparentVerifier = Callable[[str, int, str | None, str | None], str | None]


def deny_response(
    decision: Decision,
    facts: RequestFacts,
    mode: str,
    accept: str | None = None,
    status: int | None = None,
) -> http.Response:
    """The shared refusal (gateway.policy.refusal), as a mitmproxy response."""
    r = refusal(decision, facts, mode=mode, accept=accept, status=status)
    return http.Response.make(r.status, r.body, {"Content-Type": r.content_type, **dict(r.headers)})


def error_response(reason: AnyReason, status: int = 502) -> http.Response:
    return http.Response.make(status, error_body(reason), error_headers(reason))


def _latin1(headers: http.Headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.fields]


def _headers(items: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in items])


def _is_h2(req: http.Request) -> bool:
    return req.is_http2 or req.is_http3


def _index(headers: http.Headers) -> tuple[tuple[tuple[str, str], ...], Callable[[str], list[str]]]:
    """The fields as text (as `Headers.items(multi=True)` gives them) and a `get_all` over them
    that matches names as `Headers.get_all` does: one pass instead of one per lookup."""
    items = tuple(headers.items(multi=True))
    by_name: dict[bytes, list[str]] = {}
    for (name, _), (_, value) in zip(headers.fields, items, strict=True):
        by_name.setdefault(name.lower(), []).append(value)

    def get_all(name: str) -> list[str]:
        return list(by_name.get(name.encode("utf-8", "surrogateescape").lower(), ()))

    return items, get_all


def refuse_unverifiable(
    req: http.Request,
    host: str,
    port: int,
    ctx: GatewayContext,
    get_all: Callable[[str], list[str]] | None = None,
) -> Rejection | None:
    """Limits, control bytes, and a client authority that disagrees with the verified
    destination. mitmproxy keeps an absolute-form target in a tunnel or in transparent mode
    (it would send it upstream as is); in regular mode it has already made it origin-form."""
    rejected = check_limits(req.data.path, req.headers.fields, ctx.config.config.limits)
    if rejected is not None:
        return rejected
    h2 = _is_h2(req)
    return check_authority(
        host,
        port,
        host_headers=(get_all or req.headers.get_all)("host"),
        authority_field=req.authority if h2 else None,
        absolute_form=(not h2 and bool(req.authority)) or not is_origin_form(req.path),
    )


def prepare_outbound(req: http.Request, host: str, port: int, target: str | None = None) -> None:
    """Rebuild the request mitmproxy will send: origin-form, the verified authority (Host for
    HTTP/1, `:authority` for HTTP/2), hop-by-hop and framing headers recomputed, and the
    decided target (`Decision.target`, on hosts with path rules) as its path. Framing is
    what mitmproxy read the body by (HTTP/1: chunked or Content-Length, already validated);
    the upstream speaks the client's protocol (ALPN is mirrored, see `AlpnMirror`)."""
    if target is not None:
        req.path = target  # the path that was decided is the path that goes upstream
    auth = authority(host, port, req.scheme)
    fields = _latin1(req.headers)
    if _is_h2(req):
        framing = [("content-length", v) for v in req.headers.get_all("content-length")[:1]]
        if "trailers" in req.headers.get("te", "").lower():
            framing.append(("te", "trailers"))  # the one TE value HTTP/2 allows (gRPC)
        req.headers = _headers(outbound_headers(fields, None, framing))
        req.authority = auth
        return
    te = req.headers.get("transfer-encoding")
    if te is not None:
        framing = [("transfer-encoding", te.lower().replace(" ", "").replace("\t", ""))]
    else:
        framing = [("content-length", v) for v in req.headers.get_all("content-length")[:1]]
    if req.headers.get("upgrade", "").lower() == "websocket":
        framing += [("Connection", "Upgrade"), ("Upgrade", "websocket")]  # the one upgrade
    req.headers = _headers(outbound_headers(fields, auth, framing))
    req.authority = ""


class Destinations:
    """Remembers each client connection's verified destination (CONNECT target or original
    destination) before `upstream.resolve` rewrites where the server connection dials, and
    dials only addresses checked against the private-address guard."""

    def __init__(self, ctx: GatewayContext, verify_transparent: TransparentVerifier | None) -> None:
        self.ctx = ctx
        self.verify_transparent = verify_transparent
        self.conns: dict[str, ConnState] = {}  # by client connection id

    def conn(self, client_id: str) -> ConnState:
        """A live connection's state, created on first use (dropped on disconnect)."""
        c = self.conns.get(client_id)
        if c is None:
            c = self.conns[client_id] = ConnState()
        return c

    def known(self, client_id: str) -> ConnState:
        """What is known of a connection, for reading only: nothing is kept for it here."""
        return self.conns.get(client_id) or ConnState()

    def approve(
        self, client: connection.Client, address: tuple[str, int], name: str | None = None
    ) -> None:
        key = (address[0], address[1])
        c = self.conn(client.id)
        c.approved.add(key)
        if name is not None:
            c.names[key] = (name, address[1])

    def route(self, flow: http.HTTPFlow, name: str, port: int) -> None:
        """Approve an allowed request's dial and point it where `upstream.resolve` says.

        The request's host:port is rewritten (the Host header is kept) rather than only the
        server address: mitmproxy reuses a connection only when they are equal, so rewriting
        just the address opened a new upstream connection per request, and stalled."""
        req = flow.request
        # the verified name and port, not the request's host: on the transparent plane that
        # is the dialled IP, and `upstream.resolve` (target port included) is keyed by name
        try:
            key = (normalise_host(name), port)
        except ValueError:
            key = (name, port)
        target = self.ctx.connect_target(*key)
        self.approve(flow.client_conn, target)
        self.conn(flow.client_conn.id).names[target] = (name, port)
        if target != (req.host, req.port):
            req.data.host, req.data.port = target

    async def check_request(self, flow: http.HTTPFlow) -> None:
        """Resolve and check a routed request's dial address before any connection is asked
        for, so a refusal is still a 403; then point the request at the checked address, as
        `route` does (the Host header and SNI keep the name, and mitmproxy's reuse, which
        compares addresses, finds the connection again). AddressRefused, ResolveError."""
        req, client = flow.request, flow.client_conn
        address = (req.host, req.port)
        names = self.conn(client.id).names
        name, port = names[address]
        checked = (await self.ctx.dial_addresses(name, port, via=self._target(address)))[0]
        if checked != address:
            self.approve(client, checked)
            names[checked] = (name, port)
            req.data.host, req.data.port = checked

    async def check(self, client: connection.Client, address: tuple[str, int]) -> None:
        """Resolve and check a connection-level dial (TLS passed through) before deciding to
        pass it through; `server_connect` dials what was checked."""
        c = self.conn(client.id)
        name, port = c.names[address]
        addrs = await self.ctx.dial_addresses(name, port, via=self._target(address))
        c.checked[address] = addrs[0]

    def _target(self, address: tuple[str, int]) -> tuple[str, int]:
        """Where a dial address really goes: its `upstream.resolve` target, or itself."""
        try:
            return self.ctx.connect_target(normalise_host(address[0]), address[1])
        except ValueError:
            return address

    def client_disconnected(self, client: connection.Client) -> None:
        self.conns.pop(client.id, None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        c = self.conn(flow.client_conn.id)
        c.target, c.tunnelled = (flow.request.host, flow.request.port), True

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Every upstream connection passes here: nothing is dialled that no decision allowed
        (mitmproxy would otherwise connect for server-speaks-first TCP before any hook), and
        only an address checked by the private-address guard is dialled (resolved here if no
        request checked it first), with the verified name kept as the TLS server name."""
        address = data.server.address
        if address is None:
            return
        c = self.conn(data.client.id)
        address = (address[0], address[1])
        if c.target is None:
            c.target = address
        if address not in c.approved:
            tcp = self.ctx.policy.connection(address[0], address[1])
            if not (tcp.allowed and tcp.tcp):
                self._refuse(data, tcp.reason, _as_decision(tcp), Reason.NON_HTTP_KILLED)
                return
        routed = c.names.get(address)
        name, port = routed or address
        checked = c.checked.get(address)
        if checked is None:
            try:
                addrs = await self.ctx.dial_addresses(name, port, via=address if routed else None)
            except AddressRefused as e:
                refusal = Decision(Verdict.DENY, None, e.reason)
                self._refuse(data, str(e), refusal, e.reason, addr=e.addr)
                return
            except ResolveError as e:
                data.server.error = f"keyward: cannot resolve {name}: {e}"
                return
            checked = addrs[0]
        # mitmproxy defaulted the SNI to the dialled address; present the verified name (a
        # transparent connection opened before any request keeps the client's SNI)
        if data.server.tls and data.server.sni in (None, address[0]) and not is_ip(name):
            data.server.sni = name
        if checked != address:  # a connection no request routed (passthrough, raw TCP)
            data.server.address = checked

    def _refuse(
        self,
        data: server_hooks.ServerConnectionHookData,
        why: str,
        decision: Decision,
        reason: AnyReason,
        addr: str | None = None,
    ) -> None:
        """Kill a server connection before it is dialled; one audit record for it."""
        assert data.server.address is not None
        host, port = data.server.address[0], data.server.address[1]
        data.server.error = f"keyward: {why}"
        self.conn(data.client.id).refused = True
        facts = RequestFacts(Plane.MITM, "TCP", "tcp", host, port, client=_client(data.client))
        self.ctx.record(facts, decision, started=time.monotonic(), reason=reason, addr=addr)

    def verified(self, flow: http.HTTPFlow) -> tuple[str, int, str | None]:
        """(host, port, addr): the destination the policy decides on."""
        c = self.conn(flow.client_conn.id)
        if flow.client_conn.proxy_mode.type_name != "transparent":
            if c.tunnelled and c.target is not None:  # explicit proxy: the CONNECT target
                return (*c.target, None)
            return flow.request.host, flow.request.port, None  # absolute-form plain HTTP
        # transparent: the original destination (an IP), remembered before any resolve rewrite
        if c.target is None:
            c.target = (flow.request.host, flow.request.port)
        host, port = c.target
        if self.verify_transparent is None:
            return host, port, None
        name = self.verify_transparent(host, port, flow.client_conn.sni, flow.request.host_header)
        return (name or host), port, host


class ConnectionGate:
    """Refuses CONNECT targets the policy denies, passes through TLS that needs no
    interception, and kills non-HTTP flows unless a rule allows raw TCP."""

    def __init__(
        self, ctx: GatewayContext, dest: Destinations, limit: ConnectionLimit | None = None
    ) -> None:
        self.ctx = ctx
        self.dest = dest
        self.limit = limit

    def _over_limit(self, client: connection.Client) -> bool:
        """Turned away by `ConnectionLimit`: answered there, never passed through or dialled."""
        return self.limit is not None and self.limit.over_limit(client)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # answered already (over the connection limit)
            return
        started = time.monotonic()
        decision = self.ctx.policy.connection(flow.request.host, flow.request.port)
        facts = RequestFacts(
            Plane.MITM,
            "CONNECT",
            "tcp",
            flow.request.host,
            flow.request.port,
            client=_client(flow.client_conn),
        )
        if decision.allowed:
            if not self.ctx.audit.available():
                flow.response = error_response(Reason.AUDIT_UNAVAILABLE, 503)
                state(flow).audited = True
                self.ctx.record(
                    facts,
                    _as_decision(decision),
                    started=started,
                    status=503,
                    reason=Reason.AUDIT_UNAVAILABLE,
                )
            return
        mode = self.ctx.refusal_mode
        if mode is RefusalMode.RESET:
            denied = _as_decision(decision)
            flow.response = deny_response(denied, facts, mode)
            state(flow).audited = True
            self.ctx.record(facts, denied, started=started, status=403, refusal=mode)
            return
        # explain: complete the CONNECT; every request inside is answered by PolicyGate with
        # the explanation, and nothing is ever dialled (server_connect still refuses). The
        # reason is on the 200 too, for a client that then rejects our certificate.
        self.dest.conn(flow.client_conn.id).explained = True
        flow.response = http.Response(
            flow.request.data.http_version,
            200,
            b"Connection established",
            http.Headers([(REASON_HEADER.encode(), decision.reason.encode("ascii", "replace"))]),
            b"",
            None,
            time.time(),
            time.time(),
        )

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Pass TLS through untouched when the rule needs nothing from inside it. A transparent
        connection qualifies only if its SNI is verified against the dialled IP, and only if
        its address passes the private-address guard (else it is intercepted, and the request
        gate answers the refusal with a 403)."""
        client = data.context.client
        target = self.dest.known(client.id).target or data.context.server.address
        if target is None or self._over_limit(client):
            return
        sni = data.client_hello.sni
        host, addr = target[0], None
        if not self.dest.known(client.id).tunnelled and self.dest.verify_transparent is not None:
            name = self.dest.verify_transparent(target[0], target[1], sni, None)
            if name is None:
                return  # intercept; the request gate will refuse the unverified name
            host, addr = name, target[0]
        decision = self.ctx.policy.connection(host, target[1], sni=sni, addr=addr)
        if decision.allowed and decision.intercept and (sni is None or sni == host):
            # Negotiate with the upstream first, so the client is offered the protocol the
            # upstream chose (`AlpnMirror`): no HTTP/2 <-> HTTP/1.1 translation on this hop.
            self.dest.approve(client, target, host)
            try:
                await self.dest.check(client, (target[0], target[1]))
                data.establish_server_tls_first = True
            except (AddressRefused, ResolveError):
                pass  # the request gate answers the refusal; nothing is dialled first
        # With the audit log down, intercept instead: the request gate then refuses with a 503.
        if decision.allowed and not decision.intercept and self.ctx.audit.available():
            self.dest.approve(client, target, host)
            try:
                await self.dest.check(client, (target[0], target[1]))
            except (AddressRefused, ResolveError):
                return  # intercept: the request gate answers the refusal
            data.ignore_connection = True
            facts = RequestFacts(
                Plane.PASSTHROUGH,
                "TLS",
                "tls",
                host,
                target[1],
                sni=sni,
                client=_client(client),
                addr=addr,
            )
            self.ctx.record(facts, _as_decision(decision), started=time.monotonic())

    def tls_failed_client(self, data: tls.TlsData) -> None:
        """The agent rejected our certificate (it does not trust the keyward CA): audit it, so
        the operator sees why the agent failed, and whether it was a refusal being explained."""
        client = data.context.client
        if self._over_limit(client):
            return  # audited once, as connection-limit
        target = self.dest.known(client.id).target or data.context.server.address
        host, port = target if target else (client.sni or "unknown", 0)
        decision = self.ctx.policy.connection(host, port)
        facts = RequestFacts(
            Plane.MITM, "TLS", "tls", host, port, sni=client.sni, client=_client(client)
        )
        explained = self.dest.known(client.id).explained
        self.ctx.record(
            facts,
            _as_decision(decision),
            started=time.monotonic(),
            reason=Reason.CLIENT_TLS_REJECTED,
            error=self.ctx.redactor.redact(str(client.error or "tls handshake failed")),
            refusal=RefusalMode.EXPLAIN if explained else None,
        )

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Bytes mitmproxy does not recognise as HTTP (a 100 KB request line; anything inside
        intercepted TLS) are parsed as HTTP anyway unless a rule allows raw TCP there: each is
        then a request decided here, or a 400, never relayed as is (the upstream may already
        be connected: its TLS handshake ran first, see `AlpnMirror`)."""
        chosen = nextlayer.layer
        if not isinstance(chosen, layers.TCPLayer) or chosen.flow is None:
            return  # not raw TCP, or a passthrough the policy chose (no flow: ignored)
        ctx = nextlayer.context
        addr = self.dest.known(ctx.client.id).target or ctx.server.address
        if addr is None:
            return
        if not ctx.client.tls_established and not HTTP_START.match(nextlayer.data_client()):
            return  # plain non-HTTP: refused when it dials (`Destinations.server_connect`)
        decision = self.ctx.policy.connection(addr[0], addr[1])
        if not (decision.allowed and decision.tcp):
            nextlayer.layer = layers.HttpLayer(ctx, HTTPMode.transparent)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """mitmproxy relays a killed TCP flow's bytes anyway (kill is honoured for HTTP only):
        a refused flow's messages are emptied here."""
        if flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE:
            flow.messages[-1].content = b""

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        if self._over_limit(flow.client_conn):
            flow.kill()  # audited once, as connection-limit, when it closes
            return
        addr = self.dest.known(flow.client_conn.id).target or flow.server_conn.address
        started = time.monotonic()
        host, port = addr if addr else ("unknown", 0)
        decision = self.ctx.policy.connection(host, port)
        facts = RequestFacts(Plane.MITM, "TCP", "tcp", host, port, client=_client(flow.client_conn))
        audited = self.ctx.audit.available()
        if decision.allowed and decision.tcp and audited:
            self.ctx.record(facts, _as_decision(decision), started=started)
            return
        flow.kill()
        if not self.dest.known(flow.client_conn.id).refused:
            reason = Reason.NON_HTTP_KILLED if audited else Reason.AUDIT_UNAVAILABLE
            self.ctx.record(facts, _as_decision(decision), started=started, reason=reason)

    def udp_start(self, flow: udp.UDPFlow) -> None:
        addr = flow.server_conn.address or ("unknown", 0)
        flow.kill()
        facts = RequestFacts(
            Plane.MITM, "UDP", "udp", addr[0], addr[1], client=_client(flow.client_conn)
        )
        self.ctx.record(facts, None, started=time.monotonic(), reason=Reason.UDP_KILLED)


class AlpnMirror:
    """The upstream speaks the client's HTTP version, so request framing never crosses
    versions: mitmproxy's HTTP/2 -> HTTP/1.1 translation sends a body of unknown length with
    no framing at all, and the upstream reads it as a second, undecided request.

    The server handshake runs first (`establish_server_tls_first`) and mitmproxy offers the
    client what the upstream chose; if the upstream's protocol is unknown (that handshake did
    not happen or failed) the client is offered HTTP/1.1 only; a later upstream connection of
    the same client offers only the client's protocol."""

    def tls_start_client(self, data: tls.TlsData) -> None:
        if data.context.server.tls_established or data.ssl_conn is None:
            return
        app = data.ssl_conn.get_app_data()
        if isinstance(app, dict) and "http2" in app:
            app["http2"] = False

    def tls_start_server(self, data: tls.TlsData) -> None:
        client = data.context.client
        if data.ssl_conn is None or not client.tls_established or not client.alpn:
            return
        data.conn.alpn_offers = (client.alpn,)
        data.ssl_conn.set_alpn_protos([client.alpn])

    def tls_established_server(self, data: tls.TlsData) -> None:
        client = data.context.client
        if client.tls_established and (client.alpn or b"") != (data.conn.alpn or b""):
            log.warning(
                "upstream %s chose %r, client speaks %r",
                data.context.server.address,
                data.conn.alpn,
                client.alpn,
            )


class PolicyGate:
    """Decides every request on its verified destination; denials get a 403 with a reason."""

    def __init__(self, ctx: GatewayContext, dest: Destinations) -> None:
        self.ctx = ctx
        self.dest = dest

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # already answered (e.g. a refused CONNECT)
            return
        state(flow).started = time.monotonic()
        req = flow.request
        host, port, addr = self.dest.verified(flow)
        sni = flow.client_conn.sni if flow.client_conn.tls_established else None
        fields, get_all = _index(req.headers)
        facts = RequestFacts(
            plane=Plane.MITM,
            method=req.method,
            scheme=req.scheme,
            host=host,
            port=port,
            path=req.path,
            sni=sni,
            host_header=req.host_header,
            client=_client(flow.client_conn),
            addr=addr,
            # only read when placeholders exist: the core scans headers for them, nothing else
            headers=fields if self.ctx.policy.placeholders else (),
            signals=(
                MethodSignals.from_headers(get_all) if self.ctx.policy.reads_methods else NO_SIGNALS
            ),
        )
        state(flow).facts = facts
        if flow.error is not None:  # mitmproxy refused the request itself (framing headers)
            decision = Decision(Verdict.DENY, None, Reason.BAD_REQUEST)
            state(flow).decision = decision
            state(flow).audited = True
            ERROR_PAGE.set((400, Reason.BAD_REQUEST))
            self.ctx.record(facts, decision, started=state(flow).started, status=400)
            return
        rejected = refuse_unverifiable(req, host, port, self.ctx, get_all)
        if rejected is not None:
            decision = Decision(Verdict.DENY, None, rejected.reason, status=rejected.status)
            state(flow).decision = decision
            self._refuse(flow, facts, decision)
            return
        await self._settle(flow, facts, self.ctx.policy.decide(facts))

    async def request(self, flow: http.HTTPFlow) -> None:
        """A deferred request's form body is in (unstreamed, bounded): decide it for good."""
        st = state(flow)
        facts = st.facts
        if not st.deferred or facts is None:  # deferred only once decided
            return
        st.deferred, st.redecided = False, True
        body = flow.request.raw_content or b""
        facts = dataclasses.replace(facts, signals=dataclasses.replace(facts.signals, body=body))
        await self._settle(flow, facts, self.ctx.policy.decide(facts))

    async def _settle(self, flow: http.HTTPFlow, facts: RequestFacts, decision: Decision) -> None:
        req, host, port = flow.request, facts.host, facts.port
        state(flow).facts = facts
        state(flow).decision = decision
        state(flow).policy = self.ctx.config.digest  # the policy that decided
        if decision.body_limit:  # not streamed: mitmproxy buffers it, the length is bounded
            state(flow).deferred = True
        elif decision.allowed and not self.ctx.audit.available():
            # Pre-flight: nothing reaches an upstream while its record could not be written.
            self._fail(flow, facts, decision, 503, Reason.AUDIT_UNAVAILABLE)
        elif decision.allowed:
            prepare_outbound(req, host, port, decision.target)
            self.dest.route(flow, host, port)
            try:
                await self.dest.check_request(flow)
            except AddressRefused as e:
                decision = Decision(
                    Verdict.DENY, decision.rule, e.reason, normalised_path=decision.normalised_path
                )
                state(flow).decision = decision
                self._refuse(flow, facts, decision, addr=e.addr, error=str(e))
            except ResolveError as e:
                self._fail(flow, facts, decision, 502, Reason.UPSTREAM_DNS_ERROR, str(e))
        else:
            self._refuse(flow, facts, decision)
            if decision.alert:
                log.warning("placeholder sent to %s: %s", host, decision.reason)

    def _answer(
        self,
        flow: http.HTTPFlow,
        facts: RequestFacts,
        decision: Decision,
        response: http.Response,
        **record: Any,
    ) -> None:
        """Answer a request here (nothing goes upstream) and write its one record."""
        flow.response = response
        state(flow).audited = True
        self.ctx.record(
            facts,
            decision,
            started=state(flow).started,
            status=response.status_code,
            **record,
        )

    def _fail(
        self,
        flow: http.HTTPFlow,
        facts: RequestFacts,
        decision: Decision,
        status: int,
        reason: AnyReason,
        error: str | None = None,
    ) -> None:
        """An allowed request keyward cannot complete."""
        response = error_response(reason, status)
        self._answer(flow, facts, decision, response, reason=reason, error=error)

    def _refuse(
        self,
        flow: http.HTTPFlow,
        facts: RequestFacts,
        decision: Decision,
        addr: str | None = None,
        error: str | None = None,
    ) -> None:
        """A refused request, answered with the decision's status."""
        mode = self.ctx.refusal_mode
        response = deny_response(decision, facts, mode, flow.request.headers.get("accept"))
        self._answer(flow, facts, decision, response, refusal=mode, addr=addr, error=error)


class CredentialInjector:
    """Writes the plan's credentials and swaps placeholders, only for allowed decisions."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        await self._inject(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        if state(flow).redecided:  # decided after its body: not injected yet
            await self._inject(flow)
        self._trailers(flow)

    def _trailers(self, flow: http.HTTPFlow) -> None:
        """Request trailers (HTTP/1.1 chunked or HTTP/2) arrive with the end of the body, before
        mitmproxy sends them on: only fields the head could not smuggle leave, never swapped."""
        req = flow.request
        decision: Decision | None = state(flow).decision
        if not req.trailers or flow.response is not None or decision is None:
            return
        redact = self.ctx.redactor.redact
        checked = request_trailers(
            _latin1(req.trailers),
            decision,
            self.ctx.policy.placeholders_in,
            lambda value: redact(value) != value,
        )
        req.trailers = _headers(checked.kept) if checked.kept else None
        if checked.alerts:
            _alert(flow, "; ".join(checked.alerts))
            log.warning("request trailers to %s: %s", flow.request.host, "; ".join(checked.alerts))

    async def _inject(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        decision, facts = st.decision, st.facts
        if flow.response is not None or decision is None or facts is None or not decision.allowed:
            return
        plan = decision.plan
        if plan is None or not (plan.headers or plan.swaps or plan.swappable("body")):
            self._watch_body(flow, decision, no_secret)
            return
        try:
            resolve = await self.ctx.resolver_for(decision)
            headers = apply_plan(decision, _latin1(flow.request.headers), resolve)
            if plan.swaps:
                flow.request.path = swap_in_target(decision, flow.request.path, resolve)
        except Exception as e:  # token endpoint down, stale token: fail closed with a reason
            reason = Reason.CREDENTIALS_UNAVAILABLE.about(type(e).__name__)
            st.error = self.ctx.redactor.redact(str(e))
            flow.response = error_response(reason)
            st.audited = True
            self.ctx.record(
                facts, decision, started=st.started, status=502, reason=reason, error=st.error
            )
            return
        flow.request.headers = _headers(headers)
        self._watch_body(flow, decision, resolve)

    def _watch_body(
        self, flow: http.HTTPFlow, decision: Decision, resolve: Callable[[str], str]
    ) -> None:
        """Placeholders in the request body: swapped where `swap_in` has `body`, an alert
        anywhere else. A swap can change the body's length: it is then framed chunked."""
        placeholders = self.ctx.policy.placeholders
        if not placeholders:
            return
        swapper = BodySwapper(
            decision, placeholders, resolve, lambda p: _alert(flow, f"placeholder {p.env} in body")
        )
        state(flow).body = swapper
        req = flow.request
        if swapper.swaps and "content-length" in req.headers:
            del req.headers["content-length"]
            if req.http_version.startswith("HTTP/1"):
                req.headers["transfer-encoding"] = "chunked"


class Streaming:
    """Nothing waits for the end of a body: requests and responses always stream, counted
    (request bodies pass the placeholder swapper when there is one)."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or state(flow).deferred:
            return
        state(flow).bytes_up = 0
        swapper: BodySwapper | None = state(flow).body

        def count(chunk: bytes) -> list[bytes]:
            if swapper is not None:
                chunk = swapper.feed(chunk) if chunk else swapper.flush()
            state(flow).bytes_up += len(chunk)
            return [chunk] if chunk else []  # an empty chunk would end a chunked body

        flow.request.stream = count

    def request(self, flow: http.HTTPFlow) -> None:
        """A body decided after it was read whole (`redecided`) passes the swapper here."""
        if not state(flow).redecided or flow.response is not None:
            return
        req = flow.request
        body = req.raw_content or b""
        swapper: BodySwapper | None = state(flow).body
        if swapper is not None:
            body = swapper.feed(body) + swapper.flush()
            req.raw_content = body
            if "content-length" in req.headers:
                req.headers["content-length"] = str(len(body))
        state(flow).bytes_up = len(body)


class ResponseScrubber:
    """Real secret values echoed by an upstream never reach the agent, in any form the agent
    can decode: headers, the reason phrase, bodies (decoded first), event streams, trailers
    (gateway.planes.scrub). Runs after the injector, so it sees whether a credential went out."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        decision: Decision | None = state(flow).decision
        if flow.response is not None or decision is None or not decision.allowed:
            return
        self._request_headers(flow, decision)

    def request(self, flow: http.HTTPFlow) -> None:
        """A request decided after its body (`redecided`) gets its headers adjusted now."""
        if state(flow).redecided:
            self.requestheaders(flow)

    def _request_headers(self, flow: http.HTTPFlow, decision: Decision) -> None:
        items = _latin1(flow.request.headers)
        headers = upstream_request_headers(items, _credentialed(decision))
        if headers != items:
            flow.request.headers = _headers(headers)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or state(flow).audited:
            return
        resp.reason = standard_reason(resp.status_code)
        state(flow).bytes_down = 0
        items = _latin1(resp.headers)
        try:
            head = scrub_head(items, self.ctx.redactor)
        except UnscrubbableEncoding:
            self._refuse(flow)
            return
        body = head.body
        if body is None:
            resp.stream = _counter(flow)
            return
        if head.headers != items:
            resp.headers = _headers(head.headers)
        if "content-length" in resp.headers:
            # Scrubbing can change the length; let the framing fall back to chunked/close.
            del resp.headers["content-length"]
        if (
            flow.request.http_version.startswith("HTTP/1")
            and resp.status_code >= 200
            and resp.status_code not in (204, 304)
            and flow.request.method != "HEAD"
            and "transfer-encoding" not in resp.headers
        ):
            resp.headers["transfer-encoding"] = "chunked"
        failed: list[str] = []

        def scrub(chunk: bytes) -> list[bytes]:
            if failed:
                return []
            try:
                out = body.feed(chunk) if chunk else body.finish()
            except ScrubError as e:
                # Headers are out: the honest signal left is a body that does not end well.
                failed.append(e.reason)
                state(flow).reason = e.reason
                flow.kill()
                return []
            state(flow).bytes_down += sum(len(p) for p in out)
            return out

        resp.stream = scrub

    def _refuse(self, flow: http.HTTPFlow) -> None:
        """502 unscrubbable-encoding in place of the upstream's answer; its body is dropped."""
        assert flow.response is not None
        refused = error_response(Reason.UNSCRUBBABLE_ENCODING)
        flow.response.status_code = refused.status_code
        flow.response.reason = standard_reason(refused.status_code)
        flow.response.headers = refused.headers
        state(flow).reason = Reason.UNSCRUBBABLE_ENCODING
        sent: list[bool] = []
        content = refused.content or b""

        def replace(chunk: bytes) -> list[bytes]:
            if sent:
                return []
            sent.append(True)
            state(flow).bytes_down = len(content)
            return [content]

        flow.response.stream = replace

    def response(self, flow: http.HTTPFlow) -> None:
        """Trailers pass scrubbed (they arrive after the body, before this hook)."""
        resp = flow.response
        if resp is None or not resp.trailers:
            return
        redact = self.ctx.redactor.redact
        resp.trailers = _headers([(k, redact(v)) for k, v in _latin1(resp.trailers)])

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        decision: Decision | None = state(flow).decision
        if message.from_client:
            if self.ctx.policy.placeholders and decision is not None:
                self._client_message(flow, message, decision)
            return
        scrubber: MessageScrubber | None = state(flow).ws_scrub
        if scrubber is None:
            scrubber = state(flow).ws_scrub = MessageScrubber(self.ctx.redactor)
        content = message.content
        clean = scrubber.feed(content)
        if clean is content:
            return
        if message.is_text:  # a cut never splits a character; `replace` only as a last resort
            message.text = clean.decode("utf-8", "replace")
        else:
            message.content = clean

    def _client_message(
        self, flow: http.HTTPFlow, message: websocket.WebSocketMessage, decision: Decision
    ) -> None:
        """Placeholders in an agent's message: swapped where `swap_in` has `websocket` and the
        host uses the secret; passed unchanged with an alert where it does not say so; the
        message dropped with an alert on a host that does not use the secret."""
        text = message.text if message.is_text else message.content.decode("latin-1")
        seen = self.ctx.policy.placeholders_in(text)
        if not seen:
            return
        plan = decision.plan
        uses = {s for h in plan.headers for s in h.secrets} if plan is not None else set()
        if any(p.secret not in uses for p in seen):
            message.drop()
            _alert(flow, "placeholder-wrong-host in websocket message")
            log.warning("placeholder sent to %s in a WebSocket message: dropped", flow.request.host)
            return
        if any("websocket" not in p.swap_in for p in seen):
            _alert(flow, "placeholder not swapped in websocket message")
        if plan is not None and plan.swappable("websocket"):
            swapped = swap_placeholders(decision, text, self.ctx.secrets.resolve, "websocket")
            if message.is_text:
                message.text = swapped
            else:
                message.content = swapped.encode("latin-1")


class Audit:
    """Exactly one record per flow: allowed, denied, errored or aborted."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    def _write(self, flow: http.HTTPFlow, error: str | None = None) -> None:
        st = state(flow)
        facts = st.facts
        if st.audited or facts is None:
            return
        st.audited = True
        status = flow.response.status_code if flow.response is not None else None
        reason = None
        if error is not None:
            reason = Reason.UPSTREAM_TIMEOUT if st.timed_out else error_reason(error)
            if flow.request.timestamp_end is None and "protocol error" in error.lower():
                reason = Reason.BAD_REQUEST  # the agent's own request was malformed (framing)
            if status is None and reason is not Reason.CLIENT_ABORTED:
                # no response started: the agent gets our JSON error page, with this status
                status = error_status(reason, 400 if reason == Reason.BAD_REQUEST else 502)
                ERROR_PAGE.set((status, reason))
        self.ctx.record(
            facts,
            st.decision,
            started=st.started,
            status=status,
            bytes_up=st.bytes_up,
            bytes_down=st.bytes_down,
            error=error,
            reason=st.reason or reason,
            policy=st.policy,
        )

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._write(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        msg = flow.error.msg if flow.error else "error"
        self._write(flow, self.ctx.redactor.redact(msg))

    def stopped(self, flow: http.HTTPFlow) -> None:
        """The gateway stopped with this flow still live (drain bound reached)."""
        state(flow).reason = Reason.GATEWAY_STOPPING
        self._write(flow, "gateway stopping: drain bound reached")


def _credentialed(decision: Decision) -> bool:
    return decision.plan is not None and decision.plan.credentialed


def _alert(flow: http.HTTPFlow, what: str) -> None:
    """Mark the flow's audit record as an alert (written when the flow ends)."""
    decision: Decision | None = state(flow).decision
    if decision is not None and not decision.alert:
        extra = {**decision.extra, "alert": what}
        state(flow).decision = dataclasses.replace(decision, alert=True, extra=extra)


def _counter(flow: http.HTTPFlow) -> Callable[[bytes], bytes]:
    def count(chunk: bytes) -> bytes:
        state(flow).bytes_down += len(chunk)
        return chunk

    return count


def _client(client: connection.Client) -> str:
    host, port = client.peername[:2] if client.peername else ("?", 0)
    return f"{host}:{port}"


def _as_decision(cd: ConnectionDecision) -> Decision:
    """Connection-level decisions carry no plan: nothing is injected into a tunnel."""
    return Decision(cd.verdict, cd.rule, cd.reason)


def addon_chain(
    ctx: GatewayContext, verify_transparent: TransparentVerifier | None = None
) -> list[Any]:
    trailers.install()
    dest = Destinations(ctx, verify_transparent)
    audit = Audit(ctx)
    limit = ConnectionLimit(ctx)
    return [
        limit,
        dest,
        ConnectionGate(ctx, dest, limit),
        RequestHeadersTimeout(ctx),  # after the gate: it knows which TLS is passed through
        AlpnMirror(),
        PolicyGate(ctx, dest),
        CredentialInjector(ctx),
        Streaming(),
        ResponseScrubber(ctx),
        Timeouts(lambda: ctx.config.config.timeouts),
        audit,
        Drain(audit.stopped),
    ]
