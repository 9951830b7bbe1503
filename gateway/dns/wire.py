"""DNS wire format (RFC 1035, EDNS0 from RFC 6891): a small sans-IO parser and builder.

Why not mitmproxy's `dns.Message`: it was renamed between mitmproxy 11.0 and 11.1/12, it decodes
labels as IDNA text (so a label carrying arbitrary bytes, a dot or a backslash either raises or
becomes a different name), and it follows compression pointers recursively. This parser keeps
labels as raw bytes, only follows pointers that point strictly backwards (so a pointer loop cannot
exist), bounds names at 255 octets and record counts by the bytes actually present, and raises
one exception type, `WireError`, for every malformed input.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.errors import WireError as WireError  # callers catch it as wire.WireError

Labels = tuple[bytes, ...]

HEADER = struct.Struct("!HHHHHH")
_QFIXED = struct.Struct("!HH")
_RRFIXED = struct.Struct("!HHIH")

MAX_NAME = 255
MAX_LABEL = 63
MAX_MESSAGE = 65535
UDP_PLAIN_LIMIT = 512
EDNS_PAYLOAD = 1232

CLASS_IN = 1
CLASS_ANY = 255

OPCODE_QUERY = 0


class Rcode:
    """Response codes used here (RFC 1035 §4.1.1)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


TYPES: dict[int, str] = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    10: "NULL",
    12: "PTR",
    13: "HINFO",
    15: "MX",
    16: "TXT",
    17: "RP",
    18: "AFSDB",
    28: "AAAA",
    29: "LOC",
    33: "SRV",
    35: "NAPTR",
    39: "DNAME",
    41: "OPT",
    43: "DS",
    44: "SSHFP",
    46: "RRSIG",
    47: "NSEC",
    48: "DNSKEY",
    50: "NSEC3",
    52: "TLSA",
    64: "SVCB",
    65: "HTTPS",
    99: "SPF",
    249: "TKEY",
    250: "TSIG",
    251: "IXFR",
    252: "AXFR",
    253: "MAILB",
    254: "MAILA",
    255: "ANY",
    257: "CAA",
}
TYPE_CODES: dict[str, int] = {v: k for k, v in TYPES.items()}

A = 1
AAAA = 28
OPT = 41

# RDATA layouts that embed (possibly compressed) names: (fixed prefix length, number of names).
# Names are expanded when parsed so the RDATA can be written into another message unchanged.
_NAME_RDATA: dict[int, tuple[int, int]] = {
    2: (0, 1),  # NS
    5: (0, 1),  # CNAME
    12: (0, 1),  # PTR
    15: (2, 1),  # MX
    33: (6, 1),  # SRV
    39: (0, 1),  # DNAME
    6: (0, 2),  # SOA (then 20 fixed octets)
}


def type_name(code: int) -> str:
    """Mnemonic for a type code, `TYPEnnn` (RFC 3597) when unknown."""
    return TYPES.get(code, f"TYPE{code}")


def type_code(name: str) -> int | None:
    """Type code for a mnemonic or `TYPEnnn`; None when not a type."""
    up = name.upper()
    if up in TYPE_CODES:
        return TYPE_CODES[up]
    if up.startswith("TYPE") and up[4:].isdigit() and 0 <= int(up[4:]) < 65536:
        return int(up[4:])
    return None


@dataclass(frozen=True, slots=True)
class Header:
    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def qr(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def tc(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def rd(self) -> bool:
        return bool(self.flags & 0x0100)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


@dataclass(frozen=True, slots=True)
class Question:
    labels: Labels
    qtype: int
    qclass: int = CLASS_IN

    @property
    def name(self) -> str:
        return name_text(self.labels)

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record; `rdata` has any embedded names already expanded."""

    labels: Labels
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes

    @property
    def name(self) -> str:
        return name_text(self.labels)

    def address(self) -> str | None:
        """The IP of an A/AAAA record, None for other types or bad lengths."""
        if self.rtype == A and len(self.rdata) == 4:
            return str(ipaddress.IPv4Address(self.rdata))
        if self.rtype == AAAA and len(self.rdata) == 16:
            return str(ipaddress.IPv6Address(self.rdata))
        return None


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authorities: tuple[Record, ...] = ()
    additionals: tuple[Record, ...] = field(default_factory=tuple)

    def edns_payload(self) -> int | None:
        """The requester's EDNS UDP payload size, None without an OPT record."""
        opts = [r for r in self.additionals if r.rtype == OPT]
        if not opts:
            return None
        return max(opts[0].rclass, UDP_PLAIN_LIMIT)


# -- names ----------------------------------------------------------------------------------


def name_text(labels: Labels) -> str:
    """Presentation form; bytes other than letters, digits, '-' and '_' become \\DDD escapes.

    So a label holding a dot or binary data never reads as a different, valid host name.
    """
    if not labels:
        return "."
    out = []
    for label in labels:
        chars = []
        for b in label:
            c = chr(b)
            if c.isascii() and (c.isalnum() or c in "-_"):
                chars.append(c)
            elif c in ".\\":
                chars.append("\\" + c)
            else:
                chars.append(f"\\{b:03d}")
        out.append("".join(chars))
    return ".".join(out)


def encode_name(name: str) -> Labels:
    """Labels of an ASCII host name (already normalised); raises WireError if it can't be one."""
    text = name[:-1] if name.endswith(".") else name
    if not text:
        return ()
    try:
        labels = tuple(p.encode("ascii") for p in text.split("."))
    except UnicodeEncodeError as e:
        raise WireError(f"not an ASCII name: {name!r}") from e
    if any(not lb or len(lb) > MAX_LABEL for lb in labels):
        raise WireError(f"bad label in {name!r}")
    if sum(len(lb) + 1 for lb in labels) + 1 > MAX_NAME:
        raise WireError(f"name too long: {name!r}")
    return labels


def same_name(a: Labels, b: Labels) -> bool:
    """DNS names compare ASCII case-insensitively."""
    return len(a) == len(b) and all(x.lower() == y.lower() for x, y in zip(a, b, strict=True))


def _pack_name(labels: Labels) -> bytes:
    return b"".join(bytes([len(lb)]) + lb for lb in labels) + b"\x00"


def _read_name(buf: bytes, offset: int) -> tuple[Labels, int]:
    """Read a possibly compressed name at `offset`; return it and the offset after it.

    Every pointer must point before the position it was read from, so a chain of pointers
    strictly decreases and ends: no loops, no unbounded work.
    """
    labels: list[bytes] = []
    wire_len = 1
    end: int | None = None
    pos = offset
    limit = offset  # pointers must go strictly before this
    while True:
        if pos >= len(buf):
            raise WireError("name runs past the end")
        n = buf[pos]
        kind = n & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(buf):
                raise WireError("truncated compression pointer")
            target = ((n & 0x3F) << 8) | buf[pos + 1]
            if end is None:
                end = pos + 2
            if target >= limit:
                raise WireError("compression pointer does not point backwards")
            limit = target
            pos = target
            continue
        if kind != 0:
            raise WireError("reserved label type")
        if n == 0:
            return tuple(labels), (end if end is not None else pos + 1)
        if pos + 1 + n > len(buf):
            raise WireError("label runs past the end")
        wire_len += n + 1
        if wire_len > MAX_NAME:
            raise WireError("name longer than 255 octets")
        labels.append(bytes(buf[pos + 1 : pos + 1 + n]))
        pos += 1 + n


# -- parsing --------------------------------------------------------------------------------


def parse_header(buf: bytes) -> Header:
    if len(buf) < HEADER.size:
        raise WireError("shorter than a DNS header")
    return Header(*HEADER.unpack_from(buf, 0))


def _expand_rdata(buf: bytes, start: int, end: int, rtype: int) -> bytes:
    layout = _NAME_RDATA.get(rtype)
    if layout is None:
        return bytes(buf[start:end])
    fixed, names = layout
    if start + fixed > end:
        raise WireError("rdata too short")
    out = bytearray(buf[start : start + fixed])
    pos = start + fixed
    for _ in range(names):
        labels, pos = _read_name(buf, pos)
        if pos > end:
            raise WireError("name runs past its rdata")
        out += _pack_name(labels)
    out += buf[pos:end]
    return bytes(out)


def _read_records(buf: bytes, pos: int, count: int) -> tuple[tuple[Record, ...], int]:
    if count * (1 + _RRFIXED.size) > len(buf) - pos:
        raise WireError("record count larger than the message")
    out = []
    for _ in range(count):
        labels, pos = _read_name(buf, pos)
        if pos + _RRFIXED.size > len(buf):
            raise WireError("truncated record")
        rtype, rclass, ttl, rdlen = _RRFIXED.unpack_from(buf, pos)
        pos += _RRFIXED.size
        if pos + rdlen > len(buf):
            raise WireError("rdata runs past the end")
        rdata = _expand_rdata(buf, pos, pos + rdlen, rtype)
        pos += rdlen
        out.append(Record(labels, rtype, rclass, ttl & 0x7FFFFFFF, rdata))
    return tuple(out), pos


def parse_message(buf: bytes) -> Message:
    """Parse a whole message; trailing garbage or any inconsistency raises WireError."""
    if len(buf) > MAX_MESSAGE:
        raise WireError("message too large")
    header = parse_header(buf)
    pos = HEADER.size
    if header.qdcount * (1 + _QFIXED.size) > len(buf) - pos:
        raise WireError("question count larger than the message")
    questions = []
    for _ in range(header.qdcount):
        labels, pos = _read_name(buf, pos)
        if pos + _QFIXED.size > len(buf):
            raise WireError("truncated question")
        qtype, qclass = _QFIXED.unpack_from(buf, pos)
        pos += _QFIXED.size
        questions.append(Question(labels, qtype, qclass))
    answers, pos = _read_records(buf, pos, header.ancount)
    authorities, pos = _read_records(buf, pos, header.nscount)
    additionals, pos = _read_records(buf, pos, header.arcount)
    if pos != len(buf):
        raise WireError("trailing bytes after the message")
    if sum(1 for r in additionals if r.rtype == OPT) > 1:
        raise WireError("more than one OPT record")
    return Message(header, tuple(questions), answers, authorities, additionals)


# -- building -------------------------------------------------------------------------------


def _flags(*, qr: bool, opcode: int, rd: bool, ra: bool, tc: bool, rcode: int) -> int:
    return (
        (0x8000 if qr else 0)
        | ((opcode & 0xF) << 11)
        | (0x0200 if tc else 0)
        | (0x0100 if rd else 0)
        | (0x0080 if ra else 0)
        | (rcode & 0xF)
    )


def build_query(
    qid: int, labels: Labels, qtype: int, *, rd: bool = True, edns: int | None = EDNS_PAYLOAD
) -> bytes:
    """A one-question query, with an OPT record advertising `edns` bytes unless None."""
    flags = _flags(qr=False, opcode=OPCODE_QUERY, rd=rd, ra=False, tc=False, rcode=0)
    out = bytearray(HEADER.pack(qid, flags, 1, 0, 0, 1 if edns else 0))
    out += _pack_name(labels) + _QFIXED.pack(qtype, CLASS_IN)
    if edns:
        out += b"\x00" + _RRFIXED.pack(OPT, edns, 0, 0)
    return bytes(out)


def build_response(
    header: Header,
    question: Question | None,
    rcode: int,
    answers: Sequence[Record] = (),
    *,
    edns: bool = False,
    limit: int | None = None,
) -> bytes:
    """A response to `header`/`question`: copies the id, opcode and RD bit, sets QR and RA.

    Answers owned by the question's name point back at it (offset 12). If the result exceeds
    `limit` (the UDP size the client can take) the answers are dropped and TC is set, so the
    client retries over TCP.
    """
    body = _response(header, question, rcode, answers, edns=edns, tc=False)
    if limit is not None and len(body) > limit:
        body = _response(header, question, rcode, (), edns=edns, tc=True)
    return body


def _response(
    header: Header,
    question: Question | None,
    rcode: int,
    answers: Iterable[Record],
    *,
    edns: bool,
    tc: bool,
) -> bytes:
    answers = tuple(answers)
    flags = _flags(qr=True, opcode=header.opcode, rd=header.rd, ra=True, tc=tc, rcode=rcode)
    qd = 1 if question is not None else 0
    out = bytearray(HEADER.pack(header.id, flags, qd, len(answers), 0, 1 if edns else 0))
    if question is not None:
        out += _pack_name(question.labels) + _QFIXED.pack(question.qtype, question.qclass)
    for rr in answers:
        if question is not None and same_name(rr.labels, question.labels):
            out += b"\xc0\x0c"
        else:
            out += _pack_name(rr.labels)
        out += _RRFIXED.pack(rr.rtype, rr.rclass, rr.ttl, len(rr.rdata)) + rr.rdata
    if edns:
        out += b"\x00" + _RRFIXED.pack(OPT, EDNS_PAYLOAD, 0, 0)
    return bytes(out)


def address_record(labels: Labels, ip: str, ttl: int) -> Record:
    """An A or AAAA record for `ip`, chosen by its family."""
    addr = ipaddress.ip_address(ip)
    return Record(labels, A if addr.version == 4 else AAAA, CLASS_IN, ttl, addr.packed)
