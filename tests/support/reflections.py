"""Read a raw HTTP/1.1 response the way a hostile agent would, and find a key in any form.

The agent decodes everything it can: the status line and headers, chunked framing and trailers,
every content coding, hex runs, UTF-16 in either byte order and alignment, JSON escapes, and
server-sent event data joined within and across events. `leaks` names each place the key was
found; an empty list is the pass condition.
"""

from __future__ import annotations

import binascii
import gzip
import json
import re
import zlib
from dataclasses import dataclass, field

import brotli
import zstandard


@dataclass
class Parsed:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = True

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def _fields(block: bytes) -> list[tuple[str, str]]:
    out = []
    for line in block.decode("latin-1").split("\r\n"):
        if ":" in line:
            k, v = line.split(":", 1)
            out.append((k.strip(), v.strip()))
    return out


def parse(raw: bytes) -> Parsed:
    head, _, rest = raw.partition(b"\r\n\r\n")
    first, _, fields = head.partition(b"\r\n")
    parts = first.decode("latin-1").split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    p = Parsed(status, parts[2] if len(parts) > 2 else "", _fields(fields), b"")
    if "chunked" in (p.header("transfer-encoding") or "").lower():
        body, pos, complete = b"", 0, False
        while True:
            eol = rest.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(rest[pos:eol].split(b";")[0] or b"0", 16)
            if size == 0:
                trailer_block = rest[eol + 2 :]
                p.trailers = _fields(trailer_block.split(b"\r\n\r\n")[0])
                complete = True
                break
            body += rest[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
        p.body, p.complete = body, complete
    else:
        p.body = rest
    return p


def decode_body(p: Parsed) -> bytes:
    """Undo every content coding, as a client with every decoder would."""
    body = p.body
    codings = [c.strip().lower() for c in (p.header("content-encoding") or "").split(",")]
    for c in reversed([c for c in codings if c and c != "identity"]):
        if c in ("gzip", "x-gzip"):
            body = gzip.decompress(body)
        elif c == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:
                body = zlib.decompress(body, -15)
        elif c == "br":
            body = brotli.decompress(body)
        elif c == "zstd":
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return body


def _views(data: bytes) -> dict[str, bytes]:
    """Every reading of `data` an agent might try."""
    views = {"raw": data}
    for m in re.finditer(rb"[0-9a-fA-F]{12,}", data):
        for shift in (0, 1):
            run = m.group(0)[shift:]
            views[f"hex@{m.start()}+{shift}"] = binascii.unhexlify(run[: len(run) // 2 * 2])
    for codec in ("utf-16-le", "utf-16-be"):
        for shift in (0, 1):
            views[f"{codec}+{shift}"] = data[shift:].decode(codec, "replace").encode()
    unescaped = re.sub(
        rb"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)).encode(), data
    ).replace(b"\\/", b"/")
    views["json-unescaped"] = unescaped
    views["no-newlines"] = data.replace(b"\n", b"").replace(b"\r", b"")
    return views


def sse_data(body: bytes) -> bytes:
    """Every event's data lines, joined without separators, all events concatenated."""
    out = []
    for line in body.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            out.append(value[1:] if value.startswith(b" ") else value)
    return b"".join(out)


def leaks(raw: bytes, key: str) -> list[str]:
    """Where `key` can be read back out of one raw response (empty: nowhere)."""
    needle = key.encode()
    found = []
    p = parse(raw)
    meta = f"{p.reason}\n" + "\n".join(f"{k}: {v}" for k, v in p.headers + p.trailers)
    if key in meta:
        found.append("status line / headers / trailers")
    try:
        body = decode_body(p)
    except Exception:  # undecodable: read the bytes as they are
        body = p.body
    for name, view in {
        **_views(body),
        **{f"sse {k}": v for k, v in _views(sse_data(body)).items()},
    }.items():
        if needle in view:
            found.append(name)
    return found


def reassemble(raws: list[bytes]) -> bytes:
    """Put Range slices (206) back together at their offsets; a 200 contributes its whole body."""
    buf = bytearray()
    for raw in raws:
        p = parse(raw)
        start = 0
        rng = p.header("content-range")
        if p.status == 206 and rng:
            start = int(rng.split()[1].split("-")[0])
        end = start + len(p.body)
        if len(buf) < end:
            buf.extend(b"\0" * (end - len(buf)))
        buf[start:end] = p.body
    return bytes(buf)


def json_value(raw: bytes) -> object:
    return json.loads(decode_body(parse(raw)))
