"""Scrub what the agent will see: one response pipeline for both data planes.

A reflection of a real key can reach the agent in forms a scan of the wire bytes misses: inside a
compressed body, in the reason phrase, split over the `data:` lines or events of a server-sent
event stream, in trailers. This module is sans-IO: each plane feeds it response headers and body
chunks and writes what comes out.

- Bodies are decoded (`Content-Encoding`: gzip, deflate, br, zstd, stacked in any order) before
  scrubbing and forwarded identity-encoded; any other coding is refused before the body starts
  (`UnscrubbableEncoding`, a 502 `unscrubbable-encoding`).
- Decoding is incremental and bounded: zlib codings never produce more than `PIECE` bytes at a
  time; brotli and zstd are fed `STEP` input bytes at a time and one step may not produce more
  than `MAX_STEP_OUTPUT` (a decompression bomb ends the response: `ScrubError`); zstd windows are
  capped at 8 MiB (RFC 8878 §3.1.1.1.2 for HTTP).
- The decoded stream is scrubbed by `StreamScrubber` (every derived form of every real value,
  across chunk boundaries); an event stream is then scrubbed once more per event (`SseScrubber`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import brotli
import zstandard

from gateway.credentials.redact import REPLACEMENT_BYTES, Redactor, StreamScrubber
from gateway.errors import ScrubError, UnscrubbableEncoding
from gateway.reasons import Reason

DECODABLE = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "identity"})
MAX_CODINGS = 4  # stacked content codings accepted on one response
PIECE = 256 * 1024  # largest piece of decoded output handed on at once
STEP = 16 * 1024  # compressed input per brotli/zstd step
MAX_STEP_OUTPUT = 64 * 1024 * 1024  # one step producing more than this is a bomb
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
SSE_EVENT_LIMIT = 1024 * 1024  # bytes of one event (and of events held for a cross-event match)

# Response headers that describe the encoded representation: wrong once it is decoded.
ENCODED_ONLY = ("content-encoding", "content-length", "content-md5", "digest", "content-digest")
# Request headers a credentialed request never carries: a reflection of the key could otherwise
# be fetched in slices, each too short to recognise, and put together by the agent.
RANGE_HEADERS = ("range", "if-range")


def standard_reason(status: int) -> str:
    """The standard reason phrase for a status: an HTTP/1.1 upstream may put anything there,
    including what it received (`HTTP/1.1 200 Bearer <key>`)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def parse_codings(values: Iterable[str]) -> list[str]:
    """The content codings of a response, in the order they were applied (identity dropped).
    Raises `UnscrubbableEncoding` for a coding this module cannot decode."""
    codings = [
        t.strip().lower() for v in values for t in v.split(",") if t.strip().lower() != "identity"
    ]
    codings = [c for c in codings if c]
    if len(codings) > MAX_CODINGS or any(c not in DECODABLE for c in codings):
        raise UnscrubbableEncoding()
    return codings


def accept_encoding(credentialed: bool, agent_value: str | None) -> str | None:
    """What to ask the upstream for. Credentialed: identity (less to decode; an upstream that
    ignores it is decoded anyway). Otherwise the agent's wishes minus codings we cannot decode."""
    if credentialed:
        return "identity"
    if agent_value is None:
        return None
    kept = []
    for item in agent_value.split(","):
        name = item.split(";", 1)[0].strip().lower()
        if name in DECODABLE or name == "*":
            kept.append(item.strip() if name != "*" else "identity")
    return ", ".join(kept) if kept else "identity"


def upstream_request_headers(
    headers: list[tuple[str, str]], credentialed: bool
) -> list[tuple[str, str]]:
    """The agent's request headers as sent upstream: `Accept-Encoding` limited to what can be
    decoded, and no `Range`/`If-Range` on a request that carries a credential."""
    wished = [v for k, v in headers if k.lower() == "accept-encoding"]
    drop = {"accept-encoding", *(RANGE_HEADERS if credentialed else ())}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    value = accept_encoding(credentialed, ", ".join(wished) if wished else None)
    if value is not None:
        out.append(("Accept-Encoding", value))
    return out


def response_headers(
    headers: Iterable[tuple[str, str]], redactor: Redactor, decoded: bool
) -> list[tuple[str, str]]:
    """Response headers as the agent gets them: every value scrubbed; when the body is decoded,
    the headers that described its encoding dropped and a strong validator made weak."""
    items = list(headers)
    if not decoded:
        # One pass over every value at once: a value holding a known form makes the joined
        # text hold it too; only then is each value scrubbed on its own.
        joined = "\n".join(v for _, v in items)
        if redactor.redact(joined) == joined:
            return items
    out = []
    for name, value in items:
        low = name.lower()
        if decoded and low in ENCODED_ONLY:
            continue
        if decoded and low == "etag" and value.strip().startswith('"'):
            value = "W/" + value.strip()
        out.append((name, redactor.redact(value)))
    return out


class _BrotliDecompressor(Protocol):
    """What we use of `brotli.Decompressor` (the brotli package ships no type hints)."""

    def process(self, data: bytes) -> bytes: ...


class _Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> Iterator[bytes]: ...


class _Zlib:
    """gzip (every member of a multi-member body) or deflate (zlib-wrapped, or raw as some
    servers send it), never more than PIECE bytes of output per call into zlib."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.obj: zlib._Decompress | None = None
        self.head = b""

    def _new(self, first: bytes) -> zlib._Decompress:
        if self.coding == "deflate":
            # RFC 9110 says zlib format; raw deflate is common. A zlib header is CMF/FLG with
            # CM=8 and a multiple of 31.
            wrapped = (
                len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
            )
            return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes) -> Iterator[bytes]:
        data = self.head + data
        self.head = b""
        while data:
            if self.obj is None:
                if len(data) < 2:
                    self.head = data
                    return
                self.obj = self._new(data)
            try:
                out = self.obj.decompress(data, PIECE)
            except zlib.error as e:
                raise ScrubError(Reason.UNDECODABLE_BODY) from e
            if out:
                yield out
            if self.obj.eof:
                data = self.obj.unused_data
                self.obj = None
                if self.coding == "deflate" and data.strip(b"\0"):
                    raise ScrubError(Reason.UNDECODABLE_BODY)
                continue
            data = self.obj.unconsumed_tail
            if not data and len(out) == PIECE:
                data = b""  # all input taken, output may still be pending: ask again
                while len(out) == PIECE and not self.obj.eof:
                    out = self.obj.decompress(b"", PIECE)
                    if out:
                        yield out

    def finish(self) -> Iterator[bytes]:
        """A truncated body just ends: what was decoded is all the agent gets, scrubbed."""
        if self.obj is not None and not self.obj.eof:
            out = self.obj.flush()
            for i in range(0, len(out), PIECE):
                yield out[i : i + PIECE]


class _Stepped:
    """brotli or zstd: fed STEP bytes at a time, each step's output bounded."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._br: _BrotliDecompressor | None = brotli.Decompressor() if coding == "br" else None
        self._zd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._zs: zstandard.ZstdDecompressionObj | None = None
        self._ended = False

    def _step(self, data: bytes) -> bytes:
        try:
            if self._br is not None:
                return self._br.process(data)
            out = []
            while data:
                if self._zs is None:
                    self._zs = self._zd.decompressobj()
                out.append(self._zs.decompress(data))
                data = self._zs.unused_data if self._zs.eof else b""
                if self._zs.eof:
                    self._zs = None
            return b"".join(out)
        except (brotli.error, zstandard.ZstdError) as e:
            raise ScrubError(Reason.UNDECODABLE_BODY) from e

    def feed(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), STEP):
            out = self._step(data[i : i + STEP])
            if len(out) > MAX_STEP_OUTPUT:
                raise ScrubError(Reason.DECOMPRESSION_LIMIT)
            for j in range(0, len(out), PIECE):
                yield out[j : j + PIECE]

    def finish(self) -> Iterator[bytes]:
        """Nothing is buffered between steps; a truncated body just ends."""
        return iter(())


def _decoder(coding: str) -> _Decoder:
    return _Zlib(coding) if coding in ("gzip", "x-gzip", "deflate") else _Stepped(coding)


@dataclass
class _Event:
    """One server-sent event as received: its lines, and which of them are `data:` lines
    (index, prefix up to the value, value, line ending)."""

    lines: list[bytes] = field(default_factory=list)
    data: list[tuple[int, bytes, bytes, bytes]] = field(default_factory=list)
    size: int = 0

    def render(self) -> bytes:
        lines = list(self.lines)
        for index, prefix, value, end in self.data:
            lines[index] = prefix + value + end
        return b"".join(lines)


class SseScrubber:
    """Scrubs an event stream per event, on what an agent reassembles from it.

    The `data:` values of consecutive events are matched as one string without the line feeds
    a parser puts between lines (an agent may join them with or without). A match is redacted
    in the lines it spans. An event is released when it is complete, unless its data ends with
    the possible start of a known form; then it waits for the next event (or the end of the
    stream) to decide. At most `SSE_EVENT_LIMIT` bytes wait; beyond that the stream ends
    (`ScrubError("sse-event-too-large")`): an event that size is not streamed text.
    """

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._buf = b""
        self._event = _Event()
        self._held: list[_Event] = []
        self._held_size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        out: list[bytes] = []
        start = 0
        buf = self._buf
        while True:
            end = _line_end(buf, start)
            if end is None:
                break
            line = buf[start:end]
            start = end
            if line.strip(b"\r\n") == b"":
                self._event.lines.append(line)
                out.extend(self._complete())
                continue
            self._add_line(line)
        self._buf = buf[start:]
        if self._event.size + len(self._buf) + self._held_size > SSE_EVENT_LIMIT:
            raise ScrubError(Reason.SSE_EVENT_TOO_LARGE)
        return out

    def finish(self) -> list[bytes]:
        if self._buf:
            self._add_line(self._buf)
            self._buf = b""
        out = self._complete() if self._event.lines else []
        out.extend(self._release(len(self._held)))
        return out

    def _add_line(self, line: bytes) -> None:
        ev = self._event
        if line.startswith(b"data"):
            body = line.rstrip(b"\r\n")
            end = line[len(body) :]
            if body == b"data" or body.startswith(b"data:"):
                prefix_len = 5 + (body[5:6] == b" ") if body != b"data" else 4
                ev.data.append((len(ev.lines), body[:prefix_len], body[prefix_len:], end))
        ev.lines.append(line)
        ev.size += len(line)

    def _complete(self) -> list[bytes]:
        ev, self._event = self._event, _Event()
        self._held.append(ev)
        self._held_size += ev.size
        pieces = [(e, k) for e in self._held for k in range(len(e.data))]
        values = [e.data[k][2] for e, k in pieces]
        joined = b"".join(values)
        for p in self.redactor._state.passes:
            if not p.applies(joined):
                continue
            spans = [(m.start(), m.end()) for m in p.bytes_re.finditer(joined)]
            if spans:
                values = _redact_spans(values, spans)
                for (e, k), value in zip(pieces, values, strict=True):
                    index, prefix, _, end = e.data[k]
                    e.data[k] = (index, prefix, value, end)
                joined = b"".join(values)
        hold = min((p.pending(joined, max(0, len(joined) - p.max_len + 1))
                    for p in self.redactor._state.passes), default=len(joined))  # fmt: skip
        if hold >= len(joined):
            return self._release(len(self._held))
        # Release the events wholly before the pending start; keep the rest.
        offset, keep_from = 0, len(self._held)
        for i, e in enumerate(self._held):
            size = sum(len(d[2]) for d in e.data)
            if offset + size > hold:
                keep_from = i
                break
            offset += size
        return self._release(keep_from)

    def _release(self, n: int) -> list[bytes]:
        released, self._held = self._held[:n], self._held[n:]
        self._held_size = sum(e.size for e in self._held)
        return [e.render() for e in released]


def _line_end(buf: bytes, start: int) -> int | None:
    """The index after the line ending that ends the line starting at `start` (CRLF, LF or a
    lone CR), or None if the line is not complete yet."""
    lf = buf.find(b"\n", start)
    cr = buf.find(b"\r", start, lf if lf >= 0 else len(buf))
    if cr >= 0:
        if cr + 1 == len(buf):
            return None  # a CR may be the first half of CRLF
        return cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
    return lf + 1 if lf >= 0 else None


def _redact_spans(values: list[bytes], spans: list[tuple[int, int]]) -> list[bytes]:
    """`values` concatenated have matches at `spans`: cut each span out of the pieces it covers
    and put one replacement where it starts."""
    out = []
    offset = 0
    for value in values:
        lo, hi = offset, offset + len(value)
        pieces, pos = [], lo
        for a, b in spans:
            if b <= lo or a >= hi:
                continue
            pieces.append(value[pos - lo : max(a, lo) - lo])
            if a >= lo:
                pieces.append(REPLACEMENT_BYTES)
            pos = min(b, hi)
        pieces.append(value[pos - lo :])
        out.append(b"".join(pieces))
        offset = hi
    return out


class BodyScrubber:
    """One response body: decode, scrub the byte stream, scrub SSE events; `feed` and `finish`
    return the pieces to send (never an empty one: an empty chunk ends a chunked body)."""

    def __init__(
        self,
        redactor: Redactor,
        codings: list[str],
        event_stream: bool,
        length: int | None = None,
    ) -> None:
        self.redactor = redactor
        self.decoders = [_decoder(c) for c in reversed(codings)]
        self.stream = StreamScrubber(redactor)
        self.sse = SseScrubber(redactor) if event_stream else None
        # A declared identity length: a first chunk that is the whole body is scrubbed whole,
        # with nothing held back for a next chunk that cannot come (most small responses).
        self.whole = length if length and not self.decoders and self.sse is None else None
        self.fed = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.whole is not None:
            if self.fed == 0 and len(chunk) == self.whole:
                self.fed = len(chunk)
                clean = self.redactor.redact_bytes(chunk)
                return [clean] if clean else []
            if self.fed >= self.whole and chunk:
                raise ScrubError(Reason.BODY_LONGER_THAN_DECLARED)  # the parser frames by length
            self.fed += len(chunk)
        return self._after_decode(self._decode(0, chunk, final=False))

    def finish(self) -> list[bytes]:
        out = self._after_decode(self._decode(0, b"", final=True))
        tail = self.stream.flush()
        if self.sse is not None:
            if tail:
                out.extend(self.sse.feed(tail))
            out.extend(self.sse.finish())
        elif tail:
            out.append(tail)
        return [p for p in out if p]

    def _decode(self, i: int, data: bytes, final: bool) -> Iterator[bytes]:
        if i == len(self.decoders):
            if data:
                yield data
            return
        dec = self.decoders[i]
        for piece in dec.feed(data) if data else ():
            yield from self._decode(i + 1, piece, final=False)
        if final:
            for piece in dec.finish():
                yield from self._decode(i + 1, piece, final=False)
            yield from self._decode(i + 1, b"", final=True)

    def _after_decode(self, pieces: Iterable[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for piece in pieces:
            clean = self.stream.feed(piece)
            if not clean:
                continue
            if self.sse is not None:
                out.extend(self.sse.feed(clean))
            else:
                out.append(clean)
        return [p for p in out if p]


def is_event_stream(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "text/event-stream"


@dataclass
class ScrubbedHead:
    """A response head as the agent gets it, and what its body goes through (None: keyward
    knows no secret value, so there is nothing to decode or scrub). The body's pipeline is set
    up when first asked for: a small body scrubbed whole never needs one."""

    headers: list[tuple[str, str]]
    redactor: Redactor | None = None
    codings: list[str] = field(default_factory=list)
    event_stream: bool = False
    length: int | None = None  # the declared Content-Length, if one valid value

    @functools.cached_property
    def body(self) -> BodyScrubber | None:
        if self.redactor is None:
            return None
        return BodyScrubber(self.redactor, self.codings, self.event_stream, self.length)

    @property
    def rewrites_body(self) -> bool:
        """Whether the body is decoded or regrouped into events (not just scanned)."""
        return self.redactor is not None and bool(self.codings or self.event_stream)


def scrub_head(headers: Iterable[tuple[str, str]], redactor: Redactor) -> ScrubbedHead:
    """Scrub a response head and set up its body's pipeline; `UnscrubbableEncoding` for a
    content coding that cannot be decoded."""
    items = list(headers)
    if not redactor.max_len:
        return ScrubbedHead(items)
    encodings: list[str] = []
    ctype: str | None = None
    lengths: list[str] = []
    for k, v in items:
        low = k.lower()
        if low == "content-encoding":
            encodings.append(v)
        elif low == "content-type" and ctype is None:
            ctype = v
        elif low == "content-length":
            lengths.append(v.strip())
    codings = parse_codings(encodings)
    length = int(lengths[0]) if len(lengths) == 1 and lengths[0].isdigit() else None
    return ScrubbedHead(
        response_headers(items, redactor, decoded=bool(codings)),
        redactor,
        codings,
        is_event_stream(ctype),
        length,
    )


MESSAGE_CUT = 8  # bytes of a known form at a message's end that are cut from that message


class MessageScrubber:
    """Scrubs one direction of a WebSocket connection message by message, across messages.

    A message is never held back or merged: boundaries are the protocol's meaning, and holding
    one until the next arrives would stall request/reply protocols (and lose it if the
    connection closes). Instead, the bytes of the previous messages that may start a known form
    (at most its longest length minus one) are remembered, unredacted, and matched together
    with the next message: a match is redacted in the part of it the new message holds. The
    end of a message that is already `MESSAGE_CUT` bytes or more of a form's start is redacted
    in that message too, so a reflection split across messages gives the agent at most
    `MESSAGE_CUT - 1` bytes of it."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._carry = b""

    def feed(self, message: bytes) -> bytes:
        passes = self.redactor._state.passes
        carry, self._carry = self._carry, b""
        if not passes or not (message or carry):
            return message
        buf = carry + message if carry else message
        offset, n = len(carry), len(buf)
        spans: list[tuple[int, int]] = []
        hold = n
        for p in passes:
            if p.applies(buf):
                spans += [
                    (m.start(), m.end()) for m in p.bytes_re.finditer(buf) if m.end() > offset
                ]
            hold = min(hold, p.pending(buf, max(0, n - p.max_len + 1)))
        if hold < n:
            self._carry = buf[hold:]
            if n - hold >= MESSAGE_CUT:
                spans.append((hold, n))
        if not spans:
            return message
        return _redact_ranges(message, [(max(a, offset) - offset, b - offset) for a, b in spans])


def _redact_ranges(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """`data` with each maximal run of the (possibly overlapping) ranges replaced once."""
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, pos = [], 0
    for a, b in merged:
        out += [data[pos:a], REPLACEMENT_BYTES]
        pos = b
    out.append(data[pos:])
    return b"".join(out)
