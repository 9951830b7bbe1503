"""Scrub known secret values, and the encodings they travel in, out of text and streams.

Upstreams echo credentials back (error bodies, httpbin-style reflectors, Basic auth blobs), and
exceptions quote them. Every loaded value is registered here once; every outgoing log line, audit
record, error message and response body goes through one regex pass.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

REPLACEMENT = "[REDACTED]"
REPLACEMENT_BYTES = REPLACEMENT.encode()
MIN_LENGTH = 6

_PERCENT_HEX = re.compile(r"%[0-9A-F]{2}")


def _b64_aligned(raw: bytes, alphabet_urlsafe: bool) -> list[str]:
    """The base64 characters that depend only on `raw`, for each of the three byte offsets it
    can have inside a longer encoded string (e.g. the password in a Basic `user:secret` blob)."""
    out = []
    encode = base64.urlsafe_b64encode if alphabet_urlsafe else base64.b64encode
    n = len(raw)
    for k in range(3):
        text = encode(b"\0" * k + raw + b"\0\0").decode("ascii")
        start = -(-8 * k // 6)  # first character fully inside the value's bits
        end = (8 * k + 8 * n) // 6  # one past the last such character
        out.append(text[start:end])
    return out


def derived_forms(value: str) -> set[str]:
    """Every text form a value is commonly found in: raw, base64 (standard/urlsafe, padded or
    not, at any alignment), percent-encoded and JSON-escaped."""
    raw = value.encode("utf-8")
    forms = {value}
    for urlsafe in (False, True):
        encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
        full = encode(raw).decode("ascii")
        forms.add(full)
        forms.add(full.rstrip("="))
        forms.update(_b64_aligned(raw, urlsafe))
    for pct in (quote(value, safe=""), quote(value), quote_plus(value)):
        forms.add(pct)
        forms.add(_PERCENT_HEX.sub(lambda m: m.group(0).lower(), pct))
    for ascii_only in (True, False):
        escaped = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
        forms.add(escaped)
        forms.add(escaped.replace("/", "\\/"))
    return {f for f in forms if len(f) >= MIN_LENGTH}


@dataclass(frozen=True)
class _State:
    """An immutable snapshot, swapped atomically on `add`, so readers never take the lock."""

    values: frozenset[str] = frozenset()
    text_re: re.Pattern[str] | None = None
    bytes_re: re.Pattern[bytes] | None = None
    max_len: int = 0
    # For the stream scrubber: forms grouped by first byte, to find a possible partial match.
    by_first: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    first_re: re.Pattern[bytes] | None = None


def _build(values: frozenset[str]) -> _State:
    forms: set[str] = set()
    for v in values:
        forms |= derived_forms(v)
    if not forms:
        return _State(values)
    ordered = sorted(forms, key=lambda f: (-len(f.encode()), f))
    encoded = sorted({f.encode("utf-8") for f in forms}, key=lambda f: (-len(f), f))
    by_first: dict[int, list[bytes]] = {}
    for f in encoded:
        by_first.setdefault(f[0], []).append(f)
    first_class = b"".join(re.escape(bytes([b])) for b in sorted(by_first))
    return _State(
        values=values,
        text_re=re.compile("|".join(re.escape(f) for f in ordered)),
        bytes_re=re.compile(b"|".join(re.escape(f) for f in encoded)),
        max_len=len(encoded[0]),
        by_first={k: tuple(v) for k, v in by_first.items()},
        first_re=re.compile(b"[" + first_class + b"]"),
    )


class Redactor:
    """Knows every secret value (and placeholder) of the process; replaces them with
    `[REDACTED]`. Thread-safe: `add` rebuilds one compiled pattern under a lock."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._state = _State()
        for v in values:
            self.add(v)

    def add(self, value: str) -> None:
        """Register a value; values shorter than 6 characters are ignored (too much noise)."""
        if len(value) < MIN_LENGTH:
            return
        with self._lock:
            if value in self._state.values:
                return
            self._state = _build(self._state.values | {value})

    def __contains__(self, value: object) -> bool:
        return value in self._state.values

    def __len__(self) -> int:
        return len(self._state.values)

    @property
    def max_len(self) -> int:
        """Length in bytes of the longest form matched; 0 when nothing is known."""
        return self._state.max_len

    def redact(self, text: str) -> str:
        pattern = self._state.text_re
        if pattern is None or not text:
            return text
        return pattern.sub(REPLACEMENT, text)

    def redact_bytes(self, data: bytes) -> bytes:
        pattern = self._state.bytes_re
        if pattern is None or not data:
            return data
        return pattern.sub(REPLACEMENT_BYTES, data)


class StreamScrubber:
    """Redacts a streamed body chunk by chunk without waiting for its end.

    Holds back only the tail that could still be the start of a known form (never more than the
    longest form minus one byte), so the output is exactly what redacting the whole body would
    give, and a chunk with nothing to hide is returned as the same object.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        st = self._redactor._state
        held = self._held
        if st.bytes_re is None:
            if not held:
                return chunk
            self._held = b""
            return held + chunk
        buf = held + chunk if held else chunk
        n = len(buf)
        hold = _pending_start(buf, max(0, n - st.max_len + 1), st)
        pieces: list[bytes] = []
        pos = 0
        for m in st.bytes_re.finditer(buf, 0, n):
            if m.start() >= hold:
                break
            pieces.append(buf[pos : m.start()])
            pieces.append(REPLACEMENT_BYTES)
            pos = m.end()
        if not pieces and hold == n:
            self._held = b""
            return buf
        cut = max(pos, hold)
        pieces.append(buf[pos:cut])
        self._held = buf[cut:]
        return b"".join(pieces)

    def flush(self) -> bytes:
        """The held-back tail, redacted; the body has ended."""
        held, self._held = self._held, b""
        return self._redactor.redact_bytes(held)


def _pending_start(buf: bytes, start: int, st: _State) -> int:
    """The first position at or after `start` where the rest of `buf` is a proper prefix of a
    known form (a match that may complete in the next chunk); len(buf) if there is none."""
    n = len(buf)
    first_re = st.first_re
    assert first_re is not None
    m = first_re.search(buf, start)
    while m is not None:
        p = m.start()
        rest = n - p
        candidates = st.by_first[buf[p]]
        if any(len(f) > rest and f.startswith(buf[p:]) for f in candidates):
            return p
        m = first_re.search(buf, p + 1)
    return n


class RedactingFilter(logging.Filter):
    """Rewrites log records (message, arguments, exception and stack text) through a redactor."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or global_redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor.redact
        try:
            message = record.getMessage()
        except Exception:  # a bad format string still must not leak its arguments
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_GLOBAL = Redactor()


def global_redactor() -> Redactor:
    """The process-wide redactor: every secret store adds to it; the CLI error printer and the
    logging filter read it."""
    return _GLOBAL


def install_logging_filter(redactor: Redactor | None = None) -> RedactingFilter:
    """Attach one redacting filter to the root and `keyward` loggers and their handlers.
    Call after logging is configured; calling again is harmless."""
    flt = RedactingFilter(redactor)
    targets: list[logging.Filterer] = []
    for logger in (logging.getLogger(), logging.getLogger("keyward")):
        targets.append(logger)
        targets.extend(logger.handlers)
    for target in targets:
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(flt)
    return flt
