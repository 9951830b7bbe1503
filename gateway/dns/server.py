"""The DNS listener: answers only names the policy allows (LESSONS "DNS exfiltration").

A resolver that forwards every name lets data out in the labels of the query itself, so a name
the policy does not allow is answered NXDOMAIN here and never reaches any upstream. Record types
that carry data (TXT, NULL, MX, ...) are refused unless a rule's `dns_types` names them. Allowed
A/AAAA answers are remembered (`names_for`) so the transparent TLS plane can check that a
ClientHello's SNI really resolved to the address the agent connected to. An allowed name whose
answer holds a loopback, private or metadata address that no rule allows is answered REFUSED
(reason private-address), the same rule the data planes apply when they dial.

The listener is a thin adapter: the policy decides each name (`Policy.decide_name`), each query
becomes one audit record through the planes' own record builder (`Recorder`), and the wire
format is dnspython's. What stays here is transport: rate limits, the answer log, truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, Unpack

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

# dnspython imports a record type's class on first use; the ones every answer needs are loaded
# here, while the sidecar still runs before its privilege drop (the code may not be readable after).
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.OPT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

from gateway.audit.writer import Outcome
from gateway.dns.resolver import (
    MALFORMED,
    MAX_MESSAGE,
    Resolver,
    parse_message,
)
from gateway.errors import NameNotFound, NotSupported, ResolveError
from gateway.policy.addresses import ip_key
from gateway.policy.core import Decision, Plane, Policy, RequestFacts, Verdict
from gateway.policy.hosts import normalise_host
from gateway.reasons import AnyReason, Reason

log = logging.getLogger("keyward.dns")

ANSWER_TTL = 30
ADDRESS_QTYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA})
UDP_PLAIN_LIMIT = 512  # RFC 1035 §4.2.1, without EDNS
EDNS_PAYLOAD = 1232  # what we accept and advertise (the DNS flag day 2020 figure)
Rcode = dns.rcode.Rcode
# Bytes a label of a host name can hold. Anything else (a dot or a backslash inside a label,
# binary) would read as a different name once printed, so such a name is answered bad-name.
_HOST_BYTES = frozenset(b"-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Recorder(Protocol):
    """Writes one audit record: `GatewayContext.record`, the path every plane's records take."""

    def __call__(
        self,
        facts: RequestFacts,
        decision: Decision | None,
        *,
        started: float,
        **outcome: Unpack[Outcome],
    ) -> object: ...


class TokenBuckets:
    """Per-client token buckets; the table is bounded so spoofed sources cannot grow it."""

    def __init__(self, rate: float, burst: int, max_clients: int = 4096) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return ok


class AnswerLog:
    """Which names were answered with which addresses, kept `retain` seconds, bounded.

    Retained longer than the answer TTL: clients (JVMs, browsers) cache past it, and a connection
    made from a stale cache is still a connection to an address we handed out for that name.
    """

    def __init__(self, retain: float = 600.0, max_pairs: int = 65536) -> None:
        self.retain = retain
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._by_ip: dict[str, set[str]] = {}
        self._by_name: dict[str, set[str]] = {}

    def record(self, name: str, addresses: Iterable[str]) -> None:
        expires = time.monotonic() + self.retain
        for raw in addresses:
            ip = ip_key(raw)
            if ip is None:
                continue
            key = (ip, name)
            self._pairs.pop(key, None)
            self._pairs[key] = expires
            self._by_ip.setdefault(ip, set()).add(name)
            self._by_name.setdefault(name, set()).add(ip)
        while len(self._pairs) > self.max_pairs:
            (ip, name), _ = self._pairs.popitem(last=False)
            self._forget(ip, name)

    def names_for(self, ip: str) -> set[str]:
        key = ip_key(ip)
        if key is None:
            return set()
        return {n for n in list(self._by_ip.get(key, ())) if self._live(key, n)}

    def addresses_for(self, name: str) -> set[str]:
        try:
            host = normalise_host(name)
        except ValueError:
            return set()
        return {ip for ip in list(self._by_name.get(host, ())) if self._live(ip, host)}

    def _live(self, ip: str, name: str) -> bool:
        expires = self._pairs.get((ip, name))
        if expires is None:
            return False
        if expires > time.monotonic():
            return True
        del self._pairs[(ip, name)]
        self._forget(ip, name)
        return False

    def _forget(self, ip: str, name: str) -> None:
        for index, k, v in ((self._by_ip, ip, name), (self._by_name, name, ip)):
            members = index.get(k)
            if members is not None:
                members.discard(v)
                if not members:
                    del index[k]


@dataclass
class _Outcome:
    """What one query came to; becomes its one audit record."""

    method: str = ""
    host: str = ""
    decision: Decision | None = None  # None: refused before the policy was asked
    reason: AnyReason = Reason.MALFORMED
    status: int | None = None
    addr: str | None = None


class DnsListener:
    """UDP and TCP DNS on one host:port, answering per the policy."""

    def __init__(
        self,
        policy: Policy,
        resolver: Resolver,
        *,
        audit: Recorder | None = None,
        rate: float = 50.0,
        burst: int = 100,
        ttl: int = ANSWER_TTL,
        max_inflight: int = 1024,
        max_tcp_clients: int = 256,
        tcp_idle: float = 10.0,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.audit = audit
        self.ttl = ttl
        self.limiter = TokenBuckets(rate, burst)
        self.answers = AnswerLog()
        self.max_inflight = max_inflight
        self.max_tcp_clients = max_tcp_clients
        self.tcp_idle = tcp_idle
        self.port: int | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind UDP and TCP on the same port (an ephemeral one when `port` is 0)."""
        loop = asyncio.get_running_loop()
        for _ in range(20 if port == 0 else 1):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
            bound: int = udp.get_extra_info("sockname")[1]
            try:
                tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                udp.close()
                if port != 0:
                    raise
                continue
            self._udp, self._tcp, self.port = udp, tcp, bound
            log.info("dns listening on %s:%d (udp+tcp)", host, bound)
            return bound
        raise OSError(f"no port free for both UDP and TCP on {host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for w in list(self._tcp_writers):
            w.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 5)
            self._tcp = None

    # -- lookups for other planes ---------------------------------------------------------
    def names_for(self, ip: str) -> set[str]:
        """Names whose answers (recently) included `ip`."""
        return self.answers.names_for(ip)

    def answered_addresses(self, name: str) -> set[str]:
        """Addresses recently answered for `name`."""
        return self.answers.addresses_for(name)

    # -- transports -----------------------------------------------------------------------
    def _datagram(self, data: bytes, peer: tuple[str, int]) -> None:
        if len(self._tasks) >= self.max_inflight:
            self._emit(_Outcome(reason=Reason.OVERLOADED), peer, time.monotonic())
            return
        task = asyncio.ensure_future(self._answer_udp(data, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_udp(self, data: bytes, peer: tuple[str, int]) -> None:
        reply = await self.handle(data, peer, udp=True)
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, peer)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if len(self._tcp_writers) >= self.max_tcp_clients:
            writer.close()
            return
        self._tcp_writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                    (size,) = struct.unpack("!H", head)
                    if size == 0:
                        break
                    data = await asyncio.wait_for(reader.readexactly(size), self.tcp_idle)
                except (asyncio.IncompleteReadError, TimeoutError, OSError):
                    break
                reply = await self.handle(data, peer, udp=False)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    # -- the decision ---------------------------------------------------------------------
    async def handle(self, data: bytes, peer: tuple[str, int], *, udp: bool) -> bytes | None:
        """Answer one message; None = send nothing. Exactly one audit record per call."""
        started = time.monotonic()
        out = _Outcome()
        reply: bytes | None = None
        try:
            reply = await self._respond(data, peer, udp, out)
        except Exception:
            log.exception("dns: failed answering a query")
            out.reason, out.status = Reason.INTERNAL_ERROR, Rcode.SERVFAIL
            reply = _bare(data, Rcode.SERVFAIL)
            if reply is None:
                out.status = None
        finally:
            self._emit(out, peer, started)
        return reply

    async def _respond(
        self, data: bytes, peer: tuple[str, int], udp: bool, out: _Outcome
    ) -> bytes | None:
        if not self.limiter.allow(str(peer[0])):
            out.reason = Reason.RATE_LIMITED
            refusal = _refuse_quietly(data, out)
            out.status = Rcode.REFUSED if refusal is not None else None
            return refusal
        try:
            query = parse_message(data)
        except MALFORMED:
            out.reason = Reason.MALFORMED
            refusal = _bare(data, Rcode.FORMERR)
            out.status = Rcode.FORMERR if refusal is not None else None
            return refusal
        if query.flags & dns.flags.QR:
            out.reason = Reason.NOT_A_QUERY
            return None
        question = query.question[0] if len(query.question) == 1 else None
        edns = query.edns >= 0
        limit = MAX_MESSAGE
        if udp:
            limit = (
                min(max(query.payload, UDP_PLAIN_LIMIT), EDNS_PAYLOAD) if edns else UDP_PLAIN_LIMIT
            )

        def reply(rcode: int, reason: AnyReason, answer: dns.rrset.RRset | None = None) -> bytes:
            out.reason, out.status = reason, rcode
            answers = [answer] if answer is not None and len(answer) else []
            return _response(query.id, query.flags, question, rcode, answers, edns, limit)

        if query.opcode() != dns.opcode.QUERY:
            return reply(Rcode.NOTIMP, Reason.OPCODE_NOT_IMPLEMENTED)
        if question is None:
            return reply(Rcode.FORMERR, Reason.QUESTION_COUNT)
        qtype = dns.rdatatype.to_text(question.rdtype)
        out.method = qtype
        out.host = question.name.to_text(omit_final_dot=True)
        if question.rdclass != dns.rdataclass.IN:
            return reply(Rcode.REFUSED, Reason.CLASS_REFUSED)
        try:
            if not all(_HOST_BYTES.issuperset(label) for label in question.name.labels):
                raise ValueError("not a host name")
            host = normalise_host(out.host)
        except ValueError:
            return reply(Rcode.NXDOMAIN, Reason.BAD_NAME)
        out.host = host

        decision = out.decision = self.policy.decide_name(host, qtype)
        if not decision.allowed:
            return reply(decision.status, decision.reason)
        answer = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
        answer.update_ttl(self.ttl)
        try:
            if question.rdtype in ADDRESS_QTYPES:
                addrs = await self.resolver.resolve(host, qtype)
                for addr in addrs:  # the dial-time guard, applied to what the agent is told
                    if self.policy.address_refusal(host, 0, addr) is not None:
                        out.addr = addr
                        out.decision = dataclasses.replace(
                            decision, verdict=Verdict.DENY, reason=Reason.PRIVATE_ADDRESS
                        )
                        return reply(Rcode.REFUSED, Reason.PRIVATE_ADDRESS)
                self.answers.record(host, addrs)
                record = dns.rdtypes.IN.A.A if qtype == "A" else dns.rdtypes.IN.AAAA.AAAA
                for a in addrs:
                    answer.add(record(dns.rdataclass.IN, question.rdtype, a))
            else:
                for rdata in await self.resolver.lookup(host, qtype):
                    answer.add(rdata)
        except NameNotFound:
            return reply(Rcode.NXDOMAIN, Reason.NXDOMAIN_UPSTREAM)
        except NotSupported:
            return reply(Rcode.NOTIMP, Reason.NO_UPSTREAM_FOR_TYPE)
        except ResolveError:
            return reply(Rcode.SERVFAIL, Reason.UPSTREAM_ERROR)
        return reply(Rcode.NOERROR, decision.reason if len(answer) else Reason.NO_DATA, answer)

    def _emit(self, out: _Outcome, peer: tuple[str, int], started: float) -> None:
        if self.audit is None:
            return
        facts = RequestFacts(
            Plane.DNS, out.method, "dns", out.host, 53, "", client=f"{peer[0]}:{peer[1]}"
        )
        try:
            self.audit(
                facts,
                out.decision,
                started=started,
                status=out.status,
                reason=out.reason,
                addr=out.addr,
            )
        except Exception:
            log.exception("dns: audit sink failed")


def _response(
    qid: int,
    query_flags: int,
    question: dns.rrset.RRset | None,
    rcode: int,
    answers: Sequence[dns.rrset.RRset] = (),
    edns: bool = False,
    limit: int = MAX_MESSAGE,
) -> bytes:
    """A response: the query's id, opcode and RD bit, QR and RA set. Answers that do not fit
    in `limit` (what the client can take over UDP) are dropped and TC set: it retries on TCP."""
    msg = dns.message.Message(id=qid)
    msg.flags = dns.flags.QR | dns.flags.RA | (query_flags & dns.flags.RD)
    msg.set_opcode(dns.opcode.from_flags(query_flags))
    msg.set_rcode(dns.rcode.Rcode(rcode))
    if question is not None:
        msg.question = [question]
    msg.answer = list(answers)
    if edns:
        msg.use_edns(0, payload=EDNS_PAYLOAD)
    # An answer set that does not fit is left out whole (never a partial set) and TC is set.
    return msg.to_wire(max_size=limit, prefer_truncation=True)


def _bare(data: bytes, rcode: int) -> bytes | None:
    """A header-only reply for a message whose header is there and which is a query."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & dns.flags.QR:
        return None
    return _response(qid, flags, None, rcode)


def _refuse_quietly(data: bytes, out: _Outcome) -> bytes | None:
    """REFUSED for a rate-limited client, echoing its question when it parses."""
    try:
        query = parse_message(data)
    except MALFORMED:
        return _bare(data, Rcode.REFUSED)
    if query.flags & dns.flags.QR:
        return None
    question = query.question[0] if len(query.question) == 1 else None
    if question is not None:
        out.method = dns.rdatatype.to_text(question.rdtype)
        out.host = question.name.to_text(omit_final_dot=True)
        with contextlib.suppress(ValueError):
            out.host = normalise_host(out.host)
    return _response(query.id, query.flags, question, Rcode.REFUSED)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, listener: DnsListener) -> None:
        self.listener = listener

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.listener._datagram(data, (str(addr[0]), int(str(addr[1]))))

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp error: %s", exc)
