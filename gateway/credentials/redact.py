"""Scrub known secret values, and the encodings they travel in, out of text and streams.

Upstreams echo credentials back (error bodies, httpbin-style reflectors, Basic auth blobs, hex
dumps, UTF-16 text, JSON with `\\uXXXX` escapes), and exceptions quote them. Every loaded value is
registered here once; every outgoing log line, audit record, error message and response body goes
through one regex pass.
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
    """Every fixed text form a value is commonly found in: raw, base64 (standard/urlsafe,
    padded or not, at any alignment), hex (either case), percent-encoded and JSON-escaped.
    JSON `\\uXXXX` escapes mixed with literal characters are matched by `_escaped_pattern`."""
    raw = value.encode("utf-8")
    forms = {value, raw.hex(), raw.hex().upper()}
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


def derived_bytes(value: str) -> set[bytes]:
    """The byte forms of a value: its text forms in UTF-8, and the value in UTF-16LE/BE.

    The UTF-16 forms lose their leading and trailing zero bytes: for an ASCII value both byte
    orders then share one form that never starts with a zero byte (a body of zeros, the most
    common binary content, would otherwise be a candidate match at every position)."""
    forms = {f.encode("utf-8") for f in derived_forms(value)}
    forms.add(value.encode("utf-16-le").strip(b"\0"))
    forms.add(value.encode("utf-16-be").strip(b"\0"))
    return forms


# JSON's short escapes; every other character may also be written as \uXXXX (either case).
_JSON_SHORT = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _escapes(ch: str) -> list[str]:
    """The JSON escapes of one character, hex digits lower case (a surrogate pair above BMP)."""
    units = ch.encode("utf-16-be")
    out = ["".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))]
    if ch in _JSON_SHORT:
        out.append(_JSON_SHORT[ch])
    return out


def _escaped_units(value: str) -> tuple[tuple[bytes, tuple[bytes, ...]], ...]:
    """Per character: (its UTF-8 bytes, its JSON escapes), for the stream scrubber's hold test."""
    return tuple(
        (ch.encode("utf-8"), tuple(e.encode("ascii") for e in _escapes(ch))) for ch in value
    )


def _escape_alternatives(ch: str) -> str:
    """Regex source: one character, literal or escaped (hex digits in either case)."""
    alts = [re.escape(ch)]
    for esc in _escapes(ch):
        alts.append("".join(f"[{c}{c.upper()}]" if c in "abcdef" else re.escape(c) for c in esc))
    return "(?:" + "|".join(alts) + ")"


def _escaped_pattern(value: str) -> str | None:
    """Regex source for the value with any mix of JSON-escaped and literal characters: one
    alternation per character, so the pattern grows linearly with the value. It is split into
    two top-level branches that each start with a literal, so the regex engine keeps its
    first-character skip (without one, every byte of a body is tried against the pattern)."""
    if len(value) < MIN_LENGTH:
        return None
    first, rest = value[0], "".join(_escape_alternatives(c) for c in value[1:])
    escaped_first = "|".join(
        "".join(f"[{c}{c.upper()}]" if c in "abcdef" else re.escape(c) for c in esc)
        for esc in _escapes(first)
    )
    return f"(?:{escaped_first}){rest}|{re.escape(first)}{rest}"


# One value written with JSON escapes: per character, (UTF-8 bytes, its escapes).
_Units = tuple[tuple[bytes, tuple[bytes, ...]], ...]


@dataclass(frozen=True)
class _Pass:
    """One regex pass over bytes, and what the stream scrubber needs to hold back the tail of a
    chunk that may be the start of a match: candidate first bytes, and a prefix test."""

    bytes_re: re.Pattern[bytes]
    max_len: int
    first_re: re.Pattern[bytes]
    literals: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    escaped: dict[int, tuple[_Units, ...]] = field(default_factory=dict)
    # A buffer this does not find holds no match of the pass (for escaped spellings: one of
    # the escapes a value can be written with; random binary data almost never has one).
    needs: re.Pattern[bytes] | None = None
    # The literal forms that hold no other form: a buffer holding none of them holds no match
    # of the fixed pass, and `in` skips through bytes many times faster than the regex scans.
    anchors: tuple[bytes, ...] = ()
    # Anchors with a zero byte (UTF-16 forms): `in` crawls through zero-heavy data for them, so
    # there their every other byte is looked for first, in every other byte of the data.
    zero_anchors: tuple[bytes, ...] = ()

    def applies(self, data: bytes) -> bool:
        if not data:
            return False
        if self.anchors or self.zero_anchors:
            if any(a in data for a in self.anchors):
                return True
            if not self.zero_anchors:
                return False
            if data.count(0, 0, 1024) < 128:  # few zero bytes: `in` is fast enough
                return any(a in data for a in self.zero_anchors)
            halves = (data[0::2], data[1::2])
            return any(
                (a[0::2] in halves[0] or a[0::2] in halves[1]) and a in data
                for a in self.zero_anchors
            )
        return self.needs is None or self.needs.search(data) is not None

    def window(self, data: bytes) -> tuple[int, int]:
        """Where in `data` a match can lie. An escaped spelling holds a backslash (its literal
        spelling is the fixed pass's), so its matches lie within `max_len` of one."""
        if self.needs is None:
            return 0, len(data)
        first, last = data.find(b"\\"), data.rfind(b"\\")
        if first < 0:
            return 0, 0
        return max(0, first - self.max_len), min(len(data), last + self.max_len + 1)

    def pending(self, buf: bytes, start: int) -> int:
        """The first position at or after `start` where the rest of `buf` is a proper prefix of
        a match (it may complete in the next chunk); len(buf) if there is none."""
        n = len(buf)
        m = self.first_re.search(buf, start)
        while m is not None:
            p = m.start()
            rest = buf[p:]
            if any(len(f) > n - p and f.startswith(rest) for f in self.literals.get(buf[p], ())):
                return p
            if any(_escaped_prefix(buf, p, u) for u in self.escaped.get(buf[p], ())):
                return p
            m = self.first_re.search(buf, p + 1)
        return n


@dataclass(frozen=True)
class _State:
    """An immutable snapshot, swapped atomically on `add`, so readers never take the lock.

    Two passes, applied in order: the fixed forms (one alternation of literals, which keeps
    the regex engine's first-byte skip), then spellings with JSON `\\uXXXX` escapes, which
    only run on text holding such an escape. Neither pass's output can contain a match of the
    other's (`[REDACTED]` has no backslash; a fixed form has no escape), so the two passes over
    a stream give the same bytes as over the whole body."""

    values: frozenset[str] = frozenset()
    text_res: tuple[re.Pattern[str], ...] = ()
    passes: tuple[_Pass, ...] = ()
    text_needs: re.Pattern[str] | None = None  # the escaped pass's trigger, for text
    # The longest match of any pass (read on every response: derived once, here).
    max_len: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_len", max((p.max_len for p in self.passes), default=0))


def _first_class(firsts: Iterable[int]) -> re.Pattern[bytes]:
    return re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in sorted(firsts)) + b"]")


def _escape_trigger(values: Iterable[str]) -> str:
    """Regex source for an escape of a character some value holds (a `\\uXXXX` in either hex
    case, or a short escape): a spelling with escapes holds at least one, so text without any
    (a body whose only escapes are of other characters, say) skips the escaped pass."""
    alts = set()
    for ch in {c for v in values for c in v}:
        for esc in _escapes(ch):
            alts.add("".join(f"[{c}{c.upper()}]" if c in "abcdef" else re.escape(c) for c in esc))
    return "|".join(sorted(alts))


def _anchors(forms: Iterable[bytes]) -> tuple[bytes, ...]:
    """The forms that contain no other form (every form contains one of them)."""
    out: list[bytes] = []
    for f in sorted(forms, key=len):
        if not any(a in f for a in out):
            out.append(f)
    return tuple(sorted(out, key=len, reverse=True))


def _build(values: frozenset[str]) -> _State:
    forms: set[str] = set()
    raw_forms: set[bytes] = set()
    escaped_sources: list[str] = []
    escaped: dict[int, list[_Units]] = {}
    escaped_len = 0
    anchor_set: set[bytes] = set()
    for v in values:
        forms |= derived_forms(v)
        own = derived_bytes(v)
        raw_forms |= own
        anchor_set.update(_anchors(own))  # per value: linear in the number of values
        pattern = _escaped_pattern(v)
        if pattern is None:
            continue
        escaped_sources.append(pattern)
        units = _escaped_units(v)
        escaped_len = max(escaped_len, sum(max(len(e) for e in u[1]) for u in units))
        for b in {units[0][0][0], ord("\\")}:
            escaped.setdefault(b, []).append(units)
    if not forms:
        return _State(values)
    ordered = sorted(forms, key=lambda f: (-len(f.encode()), f))
    encoded = sorted(raw_forms, key=lambda f: (-len(f), f))
    literals: dict[int, list[bytes]] = {}
    for f in encoded:
        literals.setdefault(f[0], []).append(f)
    anchors = sorted(anchor_set, key=len, reverse=True)
    fixed = _Pass(
        bytes_re=re.compile(b"|".join(re.escape(f) for f in encoded)),
        max_len=len(encoded[0]),
        first_re=_first_class(literals),
        literals={k: tuple(v) for k, v in literals.items()},
        anchors=tuple(a for a in anchors if 0 not in a),
        zero_anchors=tuple(a for a in anchors if 0 in a),
    )
    text_res = [re.compile("|".join(re.escape(f) for f in ordered))]
    passes = [fixed]
    text_needs = None
    if escaped_sources:
        text_res.append(re.compile("|".join(escaped_sources)))
        trigger = _escape_trigger(values)
        text_needs = re.compile(trigger)
        passes.append(
            _Pass(
                bytes_re=re.compile("|".join(escaped_sources).encode("utf-8")),
                max_len=escaped_len,
                first_re=_first_class(escaped),
                escaped={k: tuple(v) for k, v in escaped.items()},
                needs=re.compile(trigger.encode()),
            )
        )
    return _State(values, tuple(text_res), tuple(passes), text_needs)


class Redactor:
    """Knows every secret value (and placeholder) of the process; replaces them with
    `[REDACTED]`. Thread-safe: `add` rebuilds the compiled patterns under a lock."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._state = _State()
        self.update(values)

    def add(self, value: str) -> None:
        """Register a value; values shorter than 6 characters are ignored (too much noise)."""
        self.update((value,))

    def update(self, values: Iterable[str]) -> None:
        """Register several values with one rebuild. A rebuild compiles every value's forms
        (about 40 ms a secret), so adding n secrets one at a time would cost n rebuilds."""
        new = {v for v in values if len(v) >= MIN_LENGTH}
        with self._lock:
            if new <= self._state.values:
                return
            self._state = _build(self._state.values | new)

    def __contains__(self, value: object) -> bool:
        return value in self._state.values

    def __len__(self) -> int:
        return len(self._state.values)

    @property
    def max_len(self) -> int:
        """Length in bytes of the longest form matched; 0 when nothing is known."""
        return self._state.max_len

    def redact(self, text: str) -> str:
        st = self._state
        for i, pattern in enumerate(st.text_res):
            if not text or (i and st.text_needs is not None and not st.text_needs.search(text)):
                break
            text = pattern.sub(REPLACEMENT, text)
        return text

    def redact_bytes(self, data: bytes) -> bytes:
        for p in self._state.passes:
            if p.applies(data):
                data = p.bytes_re.sub(REPLACEMENT_BYTES, data)
        return data


class StreamScrubber:
    """Redacts a streamed body chunk by chunk without waiting for its end.

    Each pass holds back only the tail that could still be the start of one of its matches
    (never more than its longest match minus one byte), so the output is exactly what
    redacting the whole body would give, and a chunk with nothing to hide is returned as the
    same object.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        passes = self._redactor._state.passes
        while len(self._held) < len(passes):
            self._held.append(b"")
        for i, p in enumerate(passes):
            chunk, self._held[i] = _scrub_step(p, self._held[i], chunk)
        return chunk

    def flush(self) -> bytes:
        """The held-back tails, redacted; the body has ended."""
        out = b""
        passes = self._redactor._state.passes
        for p, held in zip(passes, self._held, strict=False):
            data = held + out
            if p.applies(data):
                data = p.bytes_re.sub(REPLACEMENT_BYTES, data)
            out = data
        self._held = []
        return out

    @property
    def held(self) -> int:
        """Bytes held back, waiting for the next chunk."""
        return sum(len(h) for h in self._held)


def _scrub_step(p: _Pass, held: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """(what can be released, redacted; the new held-back tail)."""
    buf = held + chunk if held else chunk
    n = len(buf)
    hold = p.pending(buf, max(0, n - p.max_len + 1))
    if not p.applies(buf):
        return buf[:hold], buf[hold:]  # no match possible; only a start may be pending
    pieces: list[bytes] = []
    pos = 0
    lo, hi = p.window(buf)
    for m in p.bytes_re.finditer(buf, lo, hi):
        if m.start() >= hold:
            break
        pieces.append(buf[pos : m.start()])
        pieces.append(REPLACEMENT_BYTES)
        pos = m.end()
    if not pieces and hold == n:
        return buf, b""
    cut = max(pos, hold)
    pieces.append(buf[pos:cut])
    return b"".join(pieces), buf[cut:]


def _escaped_prefix(buf: bytes, p: int, units: _Units) -> bool:
    """Whether buf[p:] is a proper prefix of the value spelled with any mix of literal and
    JSON-escaped characters (escape hex digits compared without case: holding back a little
    too much is harmless, too little would leak)."""
    i, n = p, len(buf)
    for literal, escapes in units:
        if i >= n:
            return True
        advanced = False
        for form, fold in ((literal, False), *((e, True) for e in escapes)):
            piece = buf[i : i + len(form)]
            if fold:
                piece, form = piece.lower(), form.lower()
            if form.startswith(piece):
                if len(piece) < len(form):
                    return True  # the buffer ends inside this character
                i += len(form)
                advanced = True
                break
        if not advanced:
            return False
    return False  # the whole value is there: a complete match, not a pending one


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
