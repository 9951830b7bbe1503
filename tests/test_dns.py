"""The DNS listener on a real socket: real clients (dig, UDP and TCP), a fake upstream server.

Nothing here touches a public name or address: every name is under `.test`, the upstream is a
DNS server started on 127.0.0.1 by the test, and it records every query it received, so
"never forwarded" is checked against what actually arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit.writer import build_record
from gateway.dns.resolver import MALFORMED, Resolver, parse_message
from gateway.dns.server import AnswerLog, DnsListener, Recorder, TokenBuckets
from gateway.errors import NameNotFound
from gateway.policy import Decision, HostRule, Policy, RequestFacts, Verdict, parse_pattern
from tests.support.wait import BOUND, async_wait_until

A, NS, CNAME, MX, NULL, TXT, AAAA, OPT, ANY = 1, 2, 5, 15, 10, 16, 28, 41, 255
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

EXFIL = ".".join(["mzxw6ytboi4dsnzsgq2tmnzyhe4dkmbrgiztinjwg44dqojqgeztenbvgy3toobz"[:63]] * 3)


def make_policy(default: Verdict = Verdict.DENY) -> Policy:
    def rule(text: str, **kw: object) -> HostRule:
        return HostRule(parse_pattern(text), **kw)  # type: ignore[arg-type]

    return Policy(
        [
            rule("api.example.test"),
            rule("up.example.test"),
            rule("*.wild.example.test"),
            rule("txt.example.test", dns_types=frozenset({"TXT"})),
            rule("blocked.example.test", allow=False),
            rule("svc.example.test:8443"),
            rule("alias.example.test"),
            rule("big.example.test"),
            rule("trunc.example.test"),
            rule("v4only.example.test"),
            rule("gone.example.test"),
            rule("spoofed.example.test"),
            rule("localhost"),
            # The fake zone's answers stand in for an internal network the operator allows.
            rule("10.0.0.0/8"),
            rule("fd00::/8"),
        ],
        default=default,
        operator_targets=[("api.example.test", 443)],  # its upstream.resolve entry
    )


# -- a tiny independent DNS codec for the client side and the fake upstream ------------------


def encode(name: str) -> bytes:
    labels = [p for p in name.rstrip(".").split(".") if p]
    return b"".join(bytes([len(p)]) + p.encode() for p in labels) + b"\x00"


def query(
    name: str,
    qtype: int = A,
    *,
    qid: int | None = None,
    qclass: int = 1,
    opcode: int = 0,
    edns: int | None = None,
) -> bytes:
    qid = secrets.randbelow(65536) if qid is None else qid
    flags = (opcode << 11) | 0x0100
    pkt = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    pkt += encode(name) + struct.pack("!HH", qtype, qclass)
    if edns:
        pkt += b"\x00" + struct.pack("!HHIH", OPT, edns, 0, 0)
    return pkt


def read_name(buf: bytes, pos: int, depth: int = 0) -> tuple[str, int]:
    assert depth < 20
    labels = []
    while True:
        n = buf[pos]
        if n & 0xC0 == 0xC0:
            target = struct.unpack_from("!H", buf, pos)[0] & 0x3FFF
            rest, _ = read_name(buf, target, depth + 1)
            labels.append(rest)
            return ".".join(x for x in labels if x), pos + 2
        if n == 0:
            return ".".join(labels), pos + 1
        labels.append(buf[pos + 1 : pos + 1 + n].decode("latin-1"))
        pos += 1 + n


@dataclass
class Reply:
    id: int
    flags: int
    questions: list[tuple[str, int]]
    answers: list[tuple[str, int, int, bytes]]
    additional_types: list[int]

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def tc(self) -> bool:
        return bool(self.flags & 0x0200)

    def addresses(self) -> list[str]:
        out = []
        for _, rtype, _, rdata in self.answers:
            if rtype == A:
                out.append(socket.inet_ntop(socket.AF_INET, rdata))
            elif rtype == AAAA:
                out.append(socket.inet_ntop(socket.AF_INET6, rdata))
        return out


def parse_reply(buf: bytes) -> Reply:
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", buf)
    pos = 12
    questions = []
    for _ in range(qd):
        name, pos = read_name(buf, pos)
        qtype, _ = struct.unpack_from("!HH", buf, pos)
        pos += 4
        questions.append((name, qtype))
    records = []
    for _ in range(an + ns + ar):
        name, pos = read_name(buf, pos)
        rtype, _, ttl, rdlen = struct.unpack_from("!HHIH", buf, pos)
        pos += 10
        records.append((name, rtype, ttl, buf[pos : pos + rdlen]))
        pos += rdlen
    assert pos == len(buf)
    return Reply(qid, flags, questions, records[:an], [r[1] for r in records[an + ns :]])


async def udp_exchange(port: int, pkt: bytes, timeout: float = BOUND) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(pkt)
        return await asyncio.wait_for(got, timeout)
    finally:
        transport.close()


async def tcp_exchange(port: int, *pkts: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        out = []
        for pkt in pkts:
            writer.write(struct.pack("!H", len(pkt)) + pkt)
            await writer.drain()
            (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), BOUND))
            out.append(await reader.readexactly(size))
        return out
    finally:
        writer.close()


async def ask(port: int, name: str, qtype: int = A, **kw: object) -> Reply:
    return parse_reply(await udp_exchange(port, query(name, qtype, **kw)))  # type: ignore[arg-type]


# -- the fake upstream DNS server ------------------------------------------------------------


ZONE: dict[str, dict[int, list[str]]] = {
    "up.example.test": {A: ["10.1.2.3"], AAAA: ["fd00::123"]},
    "a.wild.example.test": {A: ["10.2.0.1"]},
    "deep.a.wild.example.test": {A: ["10.2.0.2"]},
    "wild.example.test": {A: ["10.2.0.99"]},
    "txt.example.test": {A: ["10.3.0.1"], TXT: ["hello world"]},
    "svc.example.test": {A: ["10.4.0.1"]},
    "target.example.test": {A: ["10.5.0.1"]},
    "big.example.test": {A: [f"10.6.0.{i}" for i in range(1, 41)]},
    "trunc.example.test": {A: ["10.7.0.1", "10.7.0.2"]},
    "v4only.example.test": {A: ["10.8.0.1"]},
    "spoofed.example.test": {A: ["10.9.0.1"]},
    "warned.test": {A: ["10.10.0.1"], TXT: ["secret"]},
    "evil.test": {A: ["10.66.6.6"], TXT: ["x"]},
}


@dataclass
class FakeUpstream:
    """A DNS server on 127.0.0.1 that answers from ZONE and records every question it got."""

    seen: list[tuple[str, int, str]] = field(default_factory=list)
    port: int = 0
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    def names_seen(self) -> set[str]:
        return {name for name, _, _ in self.seen}

    def answer(self, data: bytes, proto: str) -> list[bytes]:
        qid, _flags = struct.unpack_from("!HH", data)
        name, pos = read_name(data, 12)
        qtype, _ = struct.unpack_from("!HH", data, pos)
        question = data[12 : pos + 4]
        name = name.lower()
        self.seen.append((name, qtype, proto))
        flags, answers, count = 0x8180, b"", 0
        if name == "alias.example.test":
            # CNAME whose rdata points into the question; the A record's owner points into it.
            rdata = b"\x06target\xc0\x12"  # "target" + pointer to "example.test" (offset 18)
            answers += b"\xc0\x0c" + struct.pack("!HHIH", CNAME, 1, 300, len(rdata)) + rdata
            cname_at = 12 + len(question) + 12
            if qtype == A:
                ptr = struct.pack("!H", 0xC000 | cname_at)
                answers += ptr + struct.pack("!HHIH", A, 1, 300, 4)
                answers += socket.inet_aton("10.5.0.1")
                count = 2
            else:
                count = 1
        elif name not in ZONE:
            flags |= NXDOMAIN
        elif name == "trunc.example.test" and proto == "udp":
            flags |= 0x0200
        else:
            for value in ZONE[name].get(qtype, []):
                if qtype == A:
                    rdata = socket.inet_aton(value)
                elif qtype == AAAA:
                    rdata = socket.inet_pton(socket.AF_INET6, value)
                else:
                    rdata = bytes([len(value)]) + value.encode()
                answers += b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 300, len(rdata)) + rdata
                count += 1
        header = struct.pack("!HHHHHH", qid, flags, 1, count, 0, 0)
        reply = header + question + answers
        if name == "spoofed.example.test":
            wrong = struct.pack("!H", qid ^ 0x5A5A) + header[2:] + question
            wrong += b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 300, 4) + socket.inet_aton("6.6.6.6")
            return [wrong, reply]
        return [reply]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                for reply in upstream.answer(data, "udp"):
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, OSError):
                while True:
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = upstream.answer(await reader.readexactly(size), "tcp")[-1]
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            writer.close()

        for _ in range(20):
            udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(tcp, "127.0.0.1", port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return
        raise OSError("no port")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()


@dataclass
class World:
    listener: DnsListener
    port: int
    upstream: FakeUpstream
    audit: list[dict[str, object]]


def recorder(into: list[dict[str, object]]) -> Recorder:
    """The planes' record builder (what `GatewayContext.record` writes), kept in a list."""

    def record(facts: RequestFacts, decision: Decision | None, **kw: object) -> None:
        rec = build_record(facts, decision, agent="agent", policy="test", **kw)  # type: ignore[arg-type]
        into.append(rec.as_dict())

    return record


@contextlib.asynccontextmanager
async def running(
    resolver: Resolver | None = None,
    policy: Policy | None = None,
    upstream: FakeUpstream | None = None,
    **kw: object,
) -> AsyncIterator[World]:
    up = upstream or FakeUpstream()
    if upstream is None:
        await up.start()
    if resolver is None:
        resolver = Resolver(
            {"api.example.test": ["127.0.0.1", "::1"]},
            upstream=("127.0.0.1", up.port),
            use_system=False,
        )
    audit: list[dict[str, object]] = []
    listener = DnsListener(policy or make_policy(), resolver, audit=recorder(audit), **kw)  # type: ignore[arg-type]
    port = await listener.start("127.0.0.1", 0)
    try:
        yield World(listener, port, up, audit)
    finally:
        await listener.close()
        await up.close()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with running() as w:
        yield w


# -- answers ---------------------------------------------------------------------------------


async def test_allowed_name_answers_from_overrides_without_asking_upstream(world: World) -> None:
    r = await ask(world.port, "api.example.test")
    assert (r.rcode, r.addresses()) == (NOERROR, ["127.0.0.1"])
    assert r.answers[0][0] == "api.example.test" and r.answers[0][2] == 30
    r6 = await ask(world.port, "API.Example.Test.", AAAA)
    assert (r6.rcode, r6.addresses()) == (NOERROR, ["::1"])
    assert world.upstream.seen == []
    assert world.listener.names_for("127.0.0.1") == {"api.example.test"}
    assert world.listener.names_for("::ffff:127.0.0.1") == {"api.example.test"}
    assert world.listener.answered_addresses("api.example.test") == {"127.0.0.1", "::1"}


async def test_allowed_name_answers_from_fake_upstream(world: World) -> None:
    r = await ask(world.port, "up.example.test")
    assert (r.rcode, r.addresses()) == (NOERROR, ["10.1.2.3"])
    r6 = await ask(world.port, "up.example.test", AAAA)
    assert r6.addresses() == ["fd00::123"]
    assert ("up.example.test", A, "udp") in world.upstream.seen
    assert world.listener.names_for("10.1.2.3") == {"up.example.test"}
    rec = world.audit[0]
    assert rec["decision"] == "allow" and rec["rule"] == "up.example.test"
    assert rec["reason"] == "rule" and rec["status"] == NOERROR and rec["method"] == "A"


async def test_wildcard_subdomains_resolve_but_not_the_apex(world: World) -> None:
    assert (await ask(world.port, "a.wild.example.test")).addresses() == ["10.2.0.1"]
    assert (await ask(world.port, "deep.a.wild.example.test")).addresses() == ["10.2.0.2"]
    apex = await ask(world.port, "wild.example.test")
    assert (apex.rcode, apex.answers) == (NXDOMAIN, [])
    assert "wild.example.test" not in world.upstream.names_seen()


async def test_hostport_rule_makes_its_name_resolvable(world: World) -> None:
    assert (await ask(world.port, "svc.example.test")).addresses() == ["10.4.0.1"]


async def test_cname_chain_is_flattened_onto_the_asked_name(world: World) -> None:
    r = await ask(world.port, "alias.example.test")
    assert r.rcode == NOERROR
    assert [(n, t) for n, t, _, _ in r.answers] == [("alias.example.test", A)]
    assert r.addresses() == ["10.5.0.1"]


async def test_no_address_of_that_family_is_noerror_without_answers(world: World) -> None:
    r = await ask(world.port, "v4only.example.test", AAAA)
    assert (r.rcode, r.answers) == (NOERROR, [])
    assert world.audit[-1]["reason"] == "no-data"


async def test_upstream_nxdomain_for_an_allowed_name(world: World) -> None:
    r = await ask(world.port, "gone.example.test")
    assert r.rcode == NXDOMAIN
    rec = world.audit[-1]
    assert (rec["decision"], rec["reason"], rec["status"]) == ("allow", "nxdomain-upstream", 3)


# -- refusals --------------------------------------------------------------------------------


async def test_names_the_policy_does_not_allow_are_nxdomain_and_never_forwarded(
    world: World,
) -> None:
    r = await ask(world.port, "evil.test")
    assert (r.rcode, r.answers) == (NXDOMAIN, [])
    assert r.questions == [("evil.test", A)]
    assert world.audit[-1]["reason"] == "no-rule" and world.audit[-1]["decision"] == "deny"
    blocked = await ask(world.port, "blocked.example.test")
    assert blocked.rcode == NXDOMAIN
    assert world.audit[-1]["rule"] == "blocked.example.test"
    assert world.audit[-1]["reason"] == "host-denied"
    assert world.upstream.seen == []


async def test_exfiltration_shaped_names_are_nxdomain_and_never_reach_upstream(
    world: World,
) -> None:
    for qtype in (A, AAAA, TXT, NULL, ANY):
        r = await ask(world.port, f"{EXFIL}.evil.test", qtype)
        assert r.rcode == NXDOMAIN, qtype
    # Even under an allowed wildcard parent, the exfil name must not slip into a TXT query.
    r = await ask(world.port, f"{EXFIL}.wild.example.test", TXT)
    assert r.rcode == REFUSED
    assert not any("mzxw6" in name for name in world.upstream.names_seen())
    assert {rec["host"] for rec in world.audit} == {
        f"{EXFIL}.evil.test",
        f"{EXFIL}.wild.example.test",
    }


async def test_data_carrying_types_are_refused_for_allowed_names(world: World) -> None:
    for qtype, reason in (
        (TXT, "txt-refused"),
        (MX, "mx-refused"),
        (NULL, "null-refused"),
        (ANY, "any-refused"),
        (CNAME, "cname-refused"),
        (NS, "ns-refused"),
    ):
        r = await ask(world.port, "api.example.test", qtype)
        assert r.rcode == REFUSED, qtype
        assert world.audit[-1]["reason"] == reason
        assert world.audit[-1]["decision"] == "deny"
    assert world.upstream.seen == []


async def test_txt_answered_where_the_rule_lists_it(world: World) -> None:
    r = await ask(world.port, "txt.example.test", TXT)
    assert r.rcode == NOERROR
    assert [(n, t, d) for n, t, _, d in r.answers] == [
        ("txt.example.test", TXT, b"\x0bhello world")
    ]
    # Still only the listed type: MX for the same name stays refused.
    assert (await ask(world.port, "txt.example.test", MX)).rcode == REFUSED


async def test_txt_allowed_but_no_upstream_is_notimp() -> None:
    resolver = Resolver({"txt.example.test": ["10.3.0.1"]}, use_system=False)
    async with running(resolver) as w:
        r = await ask(w.port, "txt.example.test", TXT)
        assert r.rcode == NOTIMP
        assert (await ask(w.port, "txt.example.test")).addresses() == ["10.3.0.1"]
        assert (await ask(w.port, "up.example.test")).rcode == NXDOMAIN


async def test_default_warn_resolves_unlisted_names_but_never_their_txt() -> None:
    async with running(policy=make_policy(Verdict.WARN)) as w:
        r = await ask(w.port, "warned.test")
        assert r.addresses() == ["10.10.0.1"]
        rec = w.audit[-1]
        assert (rec["decision"], rec["reason"], rec["rule"]) == (
            "warn",
            "would-deny: no-rule",
            None,
        )
        assert (await ask(w.port, "warned.test", TXT)).rcode == REFUSED
        assert ("warned.test", TXT) not in {(n, t) for n, t, _ in w.upstream.seen}


async def test_upstream_timeout_is_servfail() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = Resolver(
            upstream=silent.getsockname(), use_system=False, timeout=0.2, attempts=1
        )
        async with running(resolver) as w:
            r = await ask(w.port, "up.example.test")
            assert r.rcode == SERVFAIL
            assert w.audit[-1]["reason"] == "upstream-error"
    finally:
        silent.close()


# -- protocol edges --------------------------------------------------------------------------


async def test_malformed_and_odd_messages(world: World) -> None:
    port = world.port
    two = bytearray(query("api.example.test"))
    two[4:6] = struct.pack("!H", 2)
    two += encode("up.example.test") + struct.pack("!HH", A, 1)
    r = parse_reply(await udp_exchange(port, bytes(two)))
    assert r.rcode == FORMERR and r.answers == []

    none = bytearray(query("api.example.test"))[:12]
    none[4:6] = b"\x00\x00"
    assert parse_reply(await udp_exchange(port, bytes(none))).rcode == FORMERR

    assert (await ask(port, "api.example.test", opcode=2)).rcode == NOTIMP
    assert (await ask(port, "api.example.test", qclass=3)).rcode == REFUSED

    # A name that is a compression pointer to itself.
    loop_q = struct.pack("!HHHHHH", 77, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", A, 1)
    r = parse_reply(await udp_exchange(port, loop_q))
    assert (r.id, r.rcode) == (77, FORMERR)

    # A label holding a dot must not read as a two-label allowed name.
    dotted = struct.pack("!HHHHHH", 78, 0x0100, 1, 0, 0, 0)
    dotted += b"\x10api.example.test\x00" + struct.pack("!HH", A, 1)
    r = parse_reply(await udp_exchange(port, dotted))
    assert (r.id, r.rcode, r.answers) == (78, NXDOMAIN, [])
    assert world.audit[-1]["reason"] == "bad-name"

    # A response (QR set) is never answered: no reflection.
    resp = bytearray(query("api.example.test"))
    resp[2] |= 0x80
    with pytest.raises(TimeoutError):
        await udp_exchange(port, bytes(resp), timeout=0.3)

    assert (await ask(port, "api.example.test")).addresses() == ["127.0.0.1"]
    assert world.upstream.seen == []


async def test_udp_truncates_and_tcp_carries_the_full_answer(world: World) -> None:
    r = await ask(world.port, "big.example.test")
    assert r.tc and r.answers == []
    edns = await ask(world.port, "big.example.test", edns=4096)
    assert not edns.tc and len(edns.addresses()) == 40 and edns.additional_types == [OPT]
    (raw,) = await tcp_exchange(world.port, query("big.example.test"))
    full = parse_reply(raw)
    assert not full.tc and len(full.addresses()) == 40


async def test_tcp_queries_work_and_pipeline_on_one_connection(world: World) -> None:
    raws = await tcp_exchange(
        world.port, query("api.example.test"), query("evil.test"), query("txt.example.test", TXT)
    )
    replies = [parse_reply(r) for r in raws]
    assert [r.rcode for r in replies] == [NOERROR, NXDOMAIN, NOERROR]
    assert replies[0].addresses() == ["127.0.0.1"]


async def test_resolver_falls_back_to_tcp_when_upstream_truncates(world: World) -> None:
    r = await ask(world.port, "trunc.example.test")
    assert sorted(r.addresses()) == ["10.7.0.1", "10.7.0.2"]
    protos = [p for n, _, p in world.upstream.seen if n == "trunc.example.test"]
    assert protos == ["udp", "tcp"]


async def test_resolver_ignores_a_spoofed_reply_with_the_wrong_id(world: World) -> None:
    assert (await ask(world.port, "spoofed.example.test")).addresses() == ["10.9.0.1"]


async def test_rate_limit_refuses_and_audits() -> None:
    # a token every 1000 s: however slow the machine, the burst is all there is
    async with running(rate=0.001, burst=10) as w:
        codes = [(await ask(w.port, "api.example.test")).rcode for _ in range(40)]
        assert codes == [NOERROR] * 10 + [REFUSED] * 30
        limited = [r for r in w.audit if r["reason"] == "rate-limited"]
        assert len(limited) == codes.count(REFUSED)
        assert all(r["status"] == REFUSED and r["decision"] == "deny" for r in limited)
        assert limited[0]["host"] == "api.example.test"


async def test_exactly_one_audit_record_per_query(world: World) -> None:
    sent = 0
    for name, qtype in (
        ("api.example.test", A),
        ("evil.test", A),
        ("api.example.test", TXT),
        ("txt.example.test", TXT),
        ("up.example.test", AAAA),
    ):
        await ask(world.port, name, qtype)
        sent += 1
    await udp_exchange(world.port, b"\x00\x01\x01\x00" + b"\xff" * 20)  # FORMERR
    sent += 1
    await tcp_exchange(world.port, query("api.example.test"), query("gone.example.test"))
    sent += 2
    await async_wait_until(lambda: len(world.audit) >= sent, what=f"{sent} audit records")
    assert len(world.audit) == sent
    keys = {  # among the fields of every plane's record
        "plane",
        "method",
        "host",
        "port",
        "client",
        "decision",
        "rule",
        "reason",
        "status",
        "duration_ms",
        "scheme",
        "path",
        "addr",
    }
    for rec in world.audit:
        assert keys <= set(rec)
        assert rec["plane"] == "dns" and rec["port"] == 53
        assert str(rec["client"]).startswith("127.0.0.1:")
        assert isinstance(rec["duration_ms"], float)
    assert world.audit[5]["reason"] == "malformed" and world.audit[5]["status"] == FORMERR


# -- dig -------------------------------------------------------------------------------------


async def dig(port: int, *args: str) -> str:
    if shutil.which("dig") is None:
        if os.environ.get("CI", "").lower() == "true":  # .ci/run installs it (dnsutils)
            pytest.fail("dig is not installed", pytrace=False)
        pytest.skip("dig is not installed")
    proc = await asyncio.create_subprocess_exec(
        "dig",
        "@127.0.0.1",
        "-p",
        str(port),
        "+tries=1",
        "+time=3",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode()


async def test_dig_against_the_listener(world: World) -> None:
    assert (await dig(world.port, "+short", "api.example.test", "A")).split() == ["127.0.0.1"]
    assert (await dig(world.port, "+short", "+tcp", "up.example.test", "AAAA")).split() == [
        "fd00::123"
    ]
    assert "status: NXDOMAIN" in await dig(world.port, "evil.test", "A")
    assert "status: REFUSED" in await dig(world.port, "api.example.test", "TXT")
    assert (await dig(world.port, "+short", "txt.example.test", "TXT")).strip() == '"hello world"'
    # dig retries over TCP on its own when the UDP answer is truncated.
    big = (await dig(world.port, "+short", "+noedns", "big.example.test")).split()
    assert len(big) == 40


# -- fuzzing: a real listener in its own thread, fed with datagrams ---------------------------


@pytest.fixture(scope="module")
def threaded_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    holder: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            resolver = Resolver({"api.example.test": ["127.0.0.1"]}, use_system=False)
            listener = DnsListener(make_policy(), resolver, rate=0)
            holder["port"] = await listener.start("127.0.0.1", 0)
            holder["listener"] = listener

        loop.run_until_complete(boot())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield int(holder["port"])  # type: ignore[call-overload]
    listener = holder["listener"]
    asyncio.run_coroutine_threadsafe(listener.close(), loop).result(10)  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def still_answers(sock: socket.socket, port: int) -> bool:
    qid = secrets.randbelow(65536)
    sock.sendto(query("api.example.test", qid=qid), ("127.0.0.1", port))
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        data = sock.recv(4096)
        if data[:2] == struct.pack("!H", qid):
            return parse_reply(data).addresses() == ["127.0.0.1"]
    return False


def mutate(base: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(base)
    for pos, chunk in edits:
        p = pos % (len(out) + 1)
        out[p : p + len(chunk)] = chunk
    return bytes(out)


packets = st.one_of(
    st.binary(max_size=700),
    st.builds(
        mutate,
        st.sampled_from([query("api.example.test"), query("txt.example.test", TXT, edns=1232)]),
        st.lists(st.tuples(st.integers(0, 80), st.binary(min_size=1, max_size=4)), max_size=4),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=packets)
def test_fuzzed_datagrams_never_stop_the_listener(threaded_port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(BOUND)
        if payload:
            sock.sendto(payload, ("127.0.0.1", threaded_port))
        assert still_answers(sock, threaded_port)


@settings(max_examples=50, deadline=None)
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_fuzzed_tcp_frames_never_stop_the_listener(threaded_port: int, frames: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", threaded_port), timeout=BOUND) as conn:
        for frame in frames:
            with contextlib.suppress(OSError):
                conn.sendall(struct.pack("!H", len(frame)) + frame)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(BOUND)
        assert still_answers(sock, threaded_port)


@settings(max_examples=500, deadline=None)
@given(payload=packets)
def test_parser_raises_only_dns_errors(payload: bytes) -> None:
    try:
        msg = parse_message(payload)
    except MALFORMED:
        return
    for q in msg.question:
        assert len(q.name.to_wire()) <= 255


async def test_random_bytes_always_get_a_clean_answer() -> None:
    """Every datagram that is a query (a header with QR clear) gets an answer with its id:
    FORMERR when it does not parse, never an internal error; anything else gets nothing."""
    rng = random.Random(15)
    base = [query("api.example.test"), query("txt.example.test", TXT, edns=1232)]
    payloads = [rng.randbytes(rng.randrange(0, 600)) for _ in range(1500)]
    for _ in range(1500):
        pkt = bytearray(rng.choice(base))
        for _ in range(rng.randrange(1, 5)):
            pos = rng.randrange(len(pkt) + 1)
            pkt[pos : pos + rng.randrange(1, 4)] = rng.randbytes(rng.randrange(1, 4))
        payloads.append(bytes(pkt))
    audit: list[dict[str, object]] = []
    resolver = Resolver({"api.example.test": ["127.0.0.1"]}, use_system=False)
    listener = DnsListener(make_policy(), resolver, audit=recorder(audit), rate=0)
    for payload in payloads:
        reply = await listener.handle(payload, ("127.0.0.1", 5353), udp=True)
        if len(payload) < 12 or payload[2] & 0x80:
            assert reply is None
            continue
        assert reply is not None
        qid, flags = struct.unpack_from("!HH", reply)
        assert qid == struct.unpack_from("!H", payload)[0] and flags & 0x8000
        assert flags & 0xF in (NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED)
        assert len(reply) <= 1232
    assert len(audit) == len(payloads)
    assert not [r for r in audit if r["reason"] == "internal-error"]
    assert sum(1 for r in audit if r["reason"] == "malformed") > 1000


# -- the pieces on their own -----------------------------------------------------------------


def test_pointer_chains_that_go_forward_or_loop_are_rejected() -> None:
    hdr = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    for name in (b"\xc0\x0c", b"\xc0\x0e\x00", b"\x03abc\xc0\x0c", b"\xc0\xff"):
        with pytest.raises(MALFORMED):
            parse_message(hdr + name + struct.pack("!HH", A, 1))
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"
    with pytest.raises(MALFORMED):
        parse_message(hdr + long_name + struct.pack("!HH", A, 1))


async def test_names_with_bytes_that_could_change_the_name_are_bad_names(world: World) -> None:
    for labels, shown in (
        ((b"a.b", b"test"), "a\\.b.test"),
        ((b"\x00x", b"te\\st"), "\\000x.te\\\\st"),
        ((b"::1",), "::1"),
    ):
        name = b"".join(bytes([len(lb)]) + lb for lb in labels) + b"\x00"
        pkt = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", A, 1)
        r = parse_reply(await udp_exchange(world.port, pkt))
        assert (r.id, r.rcode, r.answers) == (9, NXDOMAIN, [])
        assert (world.audit[-1]["reason"], world.audit[-1]["host"]) == ("bad-name", shown)
    assert world.upstream.seen == []


async def test_from_upstream_config_maps_host_to_ip() -> None:
    r = Resolver.from_upstream_config(
        {
            "API.example.test:443": "127.0.0.1:9443",
            "api.example.test:80": "127.0.0.2:8080",
            "v6.example.test:443": "[::1]:9443",
        },
        use_system=False,
    )
    assert r.overrides == {
        "api.example.test": ["127.0.0.1", "127.0.0.2"],
        "v6.example.test": ["::1"],
    }
    assert await r.resolve("api.example.test", "A") == ["127.0.0.1", "127.0.0.2"]
    assert await r.resolve("api.example.test", "AAAA") == []
    assert await r.resolve("v6.example.test", "AAAA") == ["::1"]
    with pytest.raises(NameNotFound):
        await r.resolve("other.example.test", "A")


async def test_resolver_caches_and_coalesces_upstream_queries() -> None:
    up = FakeUpstream()
    await up.start()
    try:
        r = Resolver(upstream=("127.0.0.1", up.port), use_system=False)
        got = await asyncio.gather(*(r.resolve("up.example.test") for _ in range(5)))
        assert got == [["10.1.2.3"]] * 5
        assert await r.resolve("up.example.test") == ["10.1.2.3"]
        for _ in range(2):
            with pytest.raises(NameNotFound):
                await r.resolve("gone.example.test")
        assert [n for n, _, _ in up.seen].count("up.example.test") == 1
        assert [n for n, _, _ in up.seen].count("gone.example.test") == 1
    finally:
        await up.close()


async def test_system_resolver_fallback_reads_local_names() -> None:
    r = Resolver(use_system=True)
    assert "127.0.0.1" in await r.resolve("localhost", "A")


def test_token_buckets_refill_and_stay_bounded() -> None:
    tb = TokenBuckets(rate=2.0, burst=3, max_clients=2)
    assert [tb.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert tb.allow("a", now=0.5)
    assert not tb.allow("a", now=0.5)
    for ip in ("b", "c", "d"):
        tb.allow(ip, now=1.0)
    assert len(tb._buckets) == 2


def test_answer_log_expires_and_is_bounded() -> None:
    log = AnswerLog(retain=60.0, max_pairs=3)
    log.record("a.example.test", ["10.0.0.1", "10.0.0.2"])
    log.record("b.example.test", ["10.0.0.1"])
    assert log.names_for("10.0.0.1") == {"a.example.test", "b.example.test"}
    log.record("c.example.test", ["10.0.0.3"])
    assert log.names_for("10.0.0.1") == {"b.example.test"}  # oldest pair evicted
    assert log.addresses_for("A.example.test.") == {"10.0.0.2"}
    gone = AnswerLog(retain=0.0)
    gone.record("a.example.test", ["10.0.0.1"])
    assert gone.names_for("10.0.0.1") == set()
    assert gone._by_ip == {} and gone._pairs == {}


async def test_private_answer_for_an_allowed_name_is_refused_and_audited() -> None:
    """The dial-time guard applied to answers: up.example.test answers 10.1.2.3 and
    fd00::123, and no rule here names those addresses."""
    policy = Policy([HostRule(parse_pattern("up.example.test"))])
    async with running(policy=policy) as w:
        for qtype in (A, AAAA):
            r = await ask(w.port, "up.example.test", qtype)
            assert (r.rcode, r.addresses()) == (REFUSED, [])
        assert not w.listener.names_for("10.1.2.3")
        recs = [x for x in w.audit if x["reason"] == "private-address"]
        assert [(x["host"], x["addr"], x["decision"]) for x in recs] == [
            ("up.example.test", "10.1.2.3", "deny"),
            ("up.example.test", "fd00::123", "deny"),
        ]
