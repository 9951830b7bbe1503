"""Where the DNS listener gets real answers: static overrides, an upstream server, or the system.

The listener asks only after the policy allowed the name, so nothing here decides anything; it
only has to be correct (answers match the question, spoofed replies are ignored), bounded (short
timeouts, a size-capped cache) and cheap under repetition (concurrent identical lookups share one
upstream query). Messages to and from an upstream server are dnspython's (`dns.message`),
imported on the first upstream query: most gateways never ask one, and the import is not free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401  (see below)
import contextlib
import ipaddress
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.rdatatype

from gateway.errors import NameNotFound, NotSupported, ResolveError
from gateway.policy.hosts import is_ip, normalise_host, split_hostport

if TYPE_CHECKING:
    import dns.message
    import dns.rdata

ADDRESS_TYPES = {"A": socket.AF_INET, "AAAA": socket.AF_INET6}
# getaddrinfo runs in asyncio's default thread pool, whose module is imported on first use: the
# import above loads it at start-up, before the sidecar drops privileges (after that, a Python
# installed where the proxy uid cannot read failed every system lookup).


_Value = list[str] | list["dns.rdata.Rdata"]
EDNS_PAYLOAD = 1232  # what upstream queries advertise
MAX_MESSAGE = 65535
Upstream = tuple[str, int] | list[tuple[str, int]] | None


def _servers(upstream: Upstream) -> list[tuple[str, int]]:
    if not upstream:
        return []
    if isinstance(upstream, tuple):
        return [upstream]
    return list(upstream)


class Resolver:
    """Overrides first, then `upstream` (ip, port) if given, else the system resolver.

    `upstream` may be a list of servers (`upstream.nameservers`): each attempt asks the next.
    """

    def __init__(
        self,
        overrides: Mapping[str, list[str]] | None = None,
        upstream: Upstream = None,
        use_system: bool = True,
        *,
        timeout: float = 2.0,
        attempts: int = 2,
        cache_ttl: float = 30.0,
        negative_ttl: float = 5.0,
        cache_size: int = 4096,
    ) -> None:
        self.overrides: dict[str, list[str]] = {
            normalise_host(k): list(dict.fromkeys(v)) for k, v in (overrides or {}).items()
        }
        self.upstream = upstream
        self._servers = _servers(upstream)
        self.use_system = use_system
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[float, _Value | NameNotFound]] = (
            OrderedDict()
        )
        self._inflight: dict[tuple[str, str], asyncio.Future[_Value]] = {}

    @classmethod
    def from_upstream_config(
        cls,
        resolve: Mapping[str, str],
        *,
        upstream: Upstream = None,
        use_system: bool = True,
    ) -> Resolver:
        """Overrides from `upstream.resolve` ("host:port" -> "ip:port"): the agent gets the IP.

        A target that is a name rather than an IP is kept and resolved like any other name.
        """
        overrides: dict[str, list[str]] = {}
        for key, target in resolve.items():
            host, _ = split_hostport(key)
            thost, _ = split_hostport(target)
            overrides.setdefault(normalise_host(host), []).append(normalise_host(thost))
        return cls(overrides, upstream, use_system)

    # -- public ---------------------------------------------------------------------------
    async def resolve(self, name: str, qtype: str = "A") -> list[str]:
        """Addresses of `name` for A or AAAA; [] when the name has none of that family."""
        qtype = qtype.upper()
        if qtype not in ADDRESS_TYPES:
            raise ValueError(f"resolve() answers A or AAAA, not {qtype}")
        host = normalise_host(name)
        got = await self._cached(host, qtype, lambda: self._resolve_addresses(host, qtype))
        return list(got)  # type: ignore[arg-type]

    async def addresses(self, name: str) -> list[str]:
        """Every A, then AAAA, address of `name`: all a dial could pick from.

        Raises NameNotFound or ResolveError when no address at all was found out.
        """
        found: list[str] = []
        failure: ResolveError | None = None
        for qtype in ADDRESS_TYPES:
            try:
                found.extend(await self.resolve(name, qtype))
            except ResolveError as e:
                failure = failure or e
        if not found:
            raise failure or NameNotFound(f"{name} has no address")
        return found

    async def lookup(self, name: str, qtype: str) -> list[dns.rdata.Rdata]:
        """Records of another type than A/AAAA (as dnspython rdata), from the upstream only."""
        qtype = qtype.upper()
        try:
            code = dns.rdatatype.from_text(qtype)
        except dns.exception.DNSException:
            code = None
        if code is None or qtype in ADDRESS_TYPES:
            raise ValueError(f"lookup() needs a non-address record type, not {qtype}")
        if not self._servers:
            raise NotSupported(f"no upstream DNS server to ask for {qtype}")
        host = normalise_host(name)
        got = await self._cached(host, qtype, lambda: self._query_upstream(host, code))
        return list(got)  # type: ignore[arg-type]

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- cache ----------------------------------------------------------------------------
    async def _cached(
        self, host: str, qtype: str, fetch: Callable[[], Awaitable[tuple[_Value, float]]]
    ) -> _Value:
        key = (host, qtype)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None:
            expires, value = hit
            if expires > now:
                self._cache.move_to_end(key)
                if isinstance(value, NameNotFound):
                    raise NameNotFound(str(value))
                return value
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Value] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value, ttl = await fetch()
        except NameNotFound as e:
            self._store(key, e, self.negative_ttl)
            fut.set_exception(NameNotFound(str(e)))
            raise
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else ResolveError("cancelled"))
            raise
        else:
            self._store(key, value, min(ttl, self.cache_ttl) if value else self.negative_ttl)
            fut.set_result(value)
            return value
        finally:
            del self._inflight[key]
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: nobody else may be waiting

    def _store(self, key: tuple[str, str], value: _Value | NameNotFound, ttl: float) -> None:
        if ttl <= 0 or self.cache_size <= 0:
            return
        self._cache[key] = (time.monotonic() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- sources --------------------------------------------------------------------------
    async def _resolve_addresses(self, host: str, qtype: str) -> tuple[list[str], float]:
        version = 4 if qtype == "A" else 6
        if is_ip(host):
            ip = ipaddress.ip_address(host)
            return ([str(ip)] if ip.version == version else []), self.cache_ttl
        if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 §6.3: never asked
            return (["127.0.0.1"] if version == 4 else ["::1"]), self.cache_ttl
        if host in self.overrides:
            out: list[str] = []
            for target in self.overrides[host]:
                if is_ip(target):
                    if ipaddress.ip_address(target).version == version:
                        out.append(target)
                    continue
                with contextlib.suppress(NameNotFound):
                    found, _ = await self._resolve_real(target, qtype)
                    out.extend(found)
            return list(dict.fromkeys(out)), self.cache_ttl
        return await self._resolve_real(host, qtype)

    async def _resolve_real(self, host: str, qtype: str) -> tuple[list[str], float]:
        if self._servers:
            rdatas, ttl = await self._query_upstream(host, dns.rdatatype.from_text(qtype))
            addrs = [str(r.address) for r in rdatas]  # type: ignore[attr-defined]
            return list(dict.fromkeys(addrs)), ttl
        if self.use_system:
            return await self._system(host, qtype), self.cache_ttl
        raise NameNotFound(f"no source knows {host}")

    async def _system(self, host: str, qtype: str) -> list[str]:
        loop = asyncio.get_running_loop()
        family = ADDRESS_TYPES[qtype]
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM),
                self.timeout * self.attempts,
            )
        except socket.gaierror as e:
            nodata = {getattr(socket, n, None) for n in ("EAI_NODATA", "EAI_ADDRFAMILY")}
            if e.errno in nodata - {None}:
                return []
            if e.errno == socket.EAI_NONAME:
                raise NameNotFound(host) from e
            raise ResolveError(f"system resolver: {e}") from e
        except TimeoutError as e:
            raise ResolveError("system resolver timed out") from e
        version = 4 if qtype == "A" else 6
        addrs = [str(info[4][0]) for info in infos]
        return list(dict.fromkeys(a for a in addrs if ipaddress.ip_address(a).version == version))

    async def _query_upstream(
        self, host: str, code: dns.rdatatype.RdataType
    ) -> tuple[list[dns.rdata.Rdata], float]:
        """Records of type `code` answering `host`, asking the upstream servers in turn: UDP
        first, TCP when the reply is truncated. A CNAME chain is flattened onto `host`."""
        import dns.message  # lazily: see the module docstring
        import dns.name
        import dns.rcode

        assert self._servers
        try:
            qname = dns.name.from_text(host)
        except dns.exception.DNSException as e:
            raise ResolveError(f"not a DNS name: {type(e).__name__}") from e
        last: Exception = ResolveError("no answer")
        for attempt in range(self.attempts * len(self._servers)):
            server = self._servers[attempt % len(self._servers)]
            query = dns.message.make_query(
                qname, code, use_edns=0, payload=EDNS_PAYLOAD, id=secrets.randbelow(65536)
            )
            try:
                reply = await _udp_exchange(server, query, self.timeout)
                if reply.flags & dns.flags.TC:
                    reply = await _tcp_exchange(server, query, self.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, *MALFORMED) as e:
                last = ResolveError(f"upstream DNS: {type(e).__name__}")
                continue
            rcode = reply.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                raise NameNotFound(host)
            if rcode != dns.rcode.NOERROR:
                raise ResolveError(f"upstream DNS answered rcode {int(rcode)}")
            rdatas = [rd for rrset in reply.answer if rrset.rdtype == code for rd in rrset]
            ttls = [rrset.ttl for rrset in reply.answer]
            return rdatas, float(min(ttls)) if ttls else self.negative_ttl
        raise last


# What a malformed message raises: dnspython's own exceptions (record data errors are wrapped
# into FormError), or ValueError (our own checks).
MALFORMED = (dns.exception.DNSException, ValueError)


def parse_message(data: bytes) -> dns.message.Message:
    """A whole message; a TSIG record is carried, not checked (nothing here is signed)."""
    import dns.message  # lazily: see the module docstring

    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    return dns.message.from_wire(data, keyring=False)


def _matches(reply: dns.message.Message, query: dns.message.Message) -> bool:
    if reply.id != query.id or not reply.flags & dns.flags.QR or len(reply.question) != 1:
        return False
    q, asked = reply.question[0], query.question[0]
    return q.rdtype == asked.rdtype and q.name == asked.name  # names compare case-insensitively


class _ReplyCatcher(asyncio.DatagramProtocol):
    """Keeps the first datagram that answers our question; anything else is ignored."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.reply: asyncio.Future[dns.message.Message] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.reply.done():
            return
        try:
            msg = parse_message(data)
        except MALFORMED:
            return
        if _matches(msg, self.query):
            self.reply.set_result(msg)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _udp_exchange(
    server: tuple[str, int], query: dns.message.Message, timeout: float
) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _ReplyCatcher(query), remote_addr=server
    )
    try:
        transport.sendto(query.to_wire())
        return await asyncio.wait_for(proto.reply, timeout)
    finally:
        transport.close()


async def _tcp_exchange(
    server: tuple[str, int], query: dns.message.Message, timeout: float
) -> dns.message.Message:
    async def run() -> dns.message.Message:
        reader, writer = await asyncio.open_connection(*server)
        try:
            writer.write(query.to_wire(prepend_length=True))
            await writer.drain()
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            msg = parse_message(await reader.readexactly(size))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not _matches(msg, query):
            raise ValueError("TCP reply does not answer the question")
        return msg

    return await asyncio.wait_for(run(), timeout)
