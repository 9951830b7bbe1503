"""Request-target canonicalisation and `METHOD glob-path` rules, Envoy's way.

A deny rule is only as good as the agreement between the path it was matched against and the
path the upstream acts on. So, like Envoy's `normalize_path` + `merge_slashes`, the target is
put in one canonical form (unreserved escapes decoded, other escapes upper-cased, `\\` read as
`/`, `//` merged, `.`/`..` resolved, anything else percent-encoded), that form is what rules
match (case-insensitively), and on hosts with path rules it is what goes upstream.

Forms that common servers (nginx, Rails, Express, Go net/http, Werkzeug, Spring) decode
differently are not guessed at: like Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST`
and Spring's StrictHttpFirewall, they are reported as `Ambiguity` classes, and the policy
refuses them where `deny:` rules exist.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum


class Ambiguity(StrEnum):
    """Why a request target could mean different paths to different servers."""

    ENCODED_SLASH = "encoded-slash"  # %2F: Werkzeug/WSGI, nginx and Go's Path decode it to /
    ENCODED_BACKSLASH = "encoded-backslash"  # %5C: decoded, then read as / on some stacks
    BACKSLASH = "backslash"  # raw \: WHATWG URL parsers (Node, browsers) read it as /
    PATH_PARAMETER = "path-parameter"  # ; or %3B: Tomcat/Spring drop ;params (`..;/`)
    DOUBLE_ENCODING = "double-encoding"  # %25: a second decoder turns %2572 into r
    INVALID_ESCAPE = "invalid-escape"  # bad %xx, or bytes that are not UTF-8 (overlong %C0%AF)
    CONTROL = "control-character"  # NUL, CR/LF, other controls, raw space, U+2028/2029
    FRAGMENT = "fragment"  # a raw # : stripped by some, kept by others
    UNICODE_LOOKALIKE = "unicode-lookalike"  # fullwidth/compatibility forms NFKC-fold to ASCII
    NOT_ORIGIN_FORM = "not-origin-form"  # a path that does not start with /


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar (without % and /): kept raw in the canonical form.
_PCHAR = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_HEX = frozenset("0123456789ABCDEFabcdef")
# Nothing to decode, encode or resolve: the canonical form is the path itself (nearly every path).
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_METHOD = re.compile(r"^[A-Za-z*]+$")
# No request-target holds whitespace or controls (RFC 9112 §3.2). Raw, they can only be an
# injection: HTTP/2 carries `:path` as a header value, and mitmproxy writes it into an HTTP/1
# request line as it is, so "/x HTTP/1.1\r\nX: y" becomes a header of the upstream request.
_RAW_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# Escaped octets whose decoding some server reads as a delimiter or a second escape.
_ESCAPE_AMBIGUITY = {
    0x2F: Ambiguity.ENCODED_SLASH,
    0x5C: Ambiguity.ENCODED_BACKSLASH,
    0x25: Ambiguity.DOUBLE_ENCODING,
    0x3B: Ambiguity.PATH_PARAMETER,
    0x23: Ambiguity.FRAGMENT,
}


@dataclass(frozen=True, slots=True)
class CanonicalTarget:
    """A request target in canonical form: what rules match and what goes upstream."""

    path: str
    query: str = ""  # "" or "?..." exactly as sent
    ambiguities: tuple[Ambiguity, ...] = ()

    @property
    def target(self) -> str:
        return self.path + self.query


def canonicalise(target: str) -> CanonicalTarget:
    """Split off the query (kept as sent) and canonicalise the path, noting ambiguities."""
    cut = target.find("?")
    path, query = (target, "") if cut < 0 else (target[:cut], target[cut:])
    if _PLAIN.fullmatch(path) and "//" not in path and "/." not in path and "#" not in query:
        return CanonicalTarget(path, query)
    found: set[Ambiguity] = set()
    if "#" in query:
        found.add(Ambiguity.FRAGMENT)
    if path and not path.startswith("/"):
        found.add(Ambiguity.NOT_ORIGIN_FORM)
    if "\\" in path:
        found.add(Ambiguity.BACKSLASH)
        path = path.replace("\\", "/")  # Envoy/Chromium: a backslash is a separator
    raw = path.split("/")
    out: list[str] = []
    trailing = False
    for seg in raw[1:] if path.startswith("/") else raw:
        seg = _canonical_segment(seg, found)
        trailing = seg in ("", ".", "..")
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    canonical = "/" + "/".join(out) + ("/" if trailing and out else "")
    return CanonicalTarget(canonical, query, tuple(sorted(found)))


def is_malformed_target(target: str) -> bool:
    """Raw whitespace or control characters: refused on every host, never canonicalised."""
    return _RAW_CONTROL.search(target) is not None


def normalise_path(path: str) -> str:
    """The canonical path alone (query dropped)."""
    return canonicalise(path).path


def _canonical_segment(seg: str, found: set[Ambiguity]) -> str:
    out: list[str] = []
    pending = bytearray()  # non-ASCII octets, validated as UTF-8 once the run ends
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c == "%":
            if i + 2 < n and seg[i + 1] in _HEX and seg[i + 2] in _HEX:
                octet = int(seg[i + 1 : i + 3], 16)
                i += 3
                if octet >= 0x80:
                    pending.append(octet)
                    continue
                _flush(pending, out, found)
                ch = chr(octet)
                if ch in _UNRESERVED:
                    out.append(ch)
                    continue
                out.append(f"%{octet:02X}")
                if octet < 0x20 or octet == 0x7F:
                    found.add(Ambiguity.CONTROL)
                elif octet in _ESCAPE_AMBIGUITY:
                    found.add(_ESCAPE_AMBIGUITY[octet])
                continue
            _flush(pending, out, found)
            found.add(Ambiguity.INVALID_ESCAPE)
            out.append("%25")
            i += 1
            continue
        i += 1
        if c >= "\x80":
            pending.extend(c.encode("utf-8", "surrogateescape"))
            continue
        _flush(pending, out, found)
        if c in _PCHAR:
            if c == ";":
                found.add(Ambiguity.PATH_PARAMETER)
            out.append(c)
            continue
        if c <= " " or c == "\x7f":
            found.add(Ambiguity.CONTROL)
        elif c == "#":
            found.add(Ambiguity.FRAGMENT)
        out.append(f"%{ord(c):02X}")
    _flush(pending, out, found)
    return "".join(out)


def _flush(pending: bytearray, out: list[str], found: set[Ambiguity]) -> None:
    """Percent-encode a run of non-ASCII octets, noting invalid UTF-8 and ASCII lookalikes."""
    if not pending:
        return
    try:
        text = pending.decode("utf-8")
    except UnicodeDecodeError:
        found.add(Ambiguity.INVALID_ESCAPE)
    else:
        for ch in text:
            cat = unicodedata.category(ch)
            if cat in ("Cc", "Zl", "Zp"):
                found.add(Ambiguity.CONTROL)
            elif any(f < "\x80" for f in unicodedata.normalize("NFKC", ch)):
                found.add(Ambiguity.UNICODE_LOOKALIKE)
    out.append("".join(f"%{b:02X}" for b in pending))
    pending.clear()


def _glob_to_regex(glob: str) -> re.Pattern[str]:
    parts: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("/**", i) and (i + 3 == len(glob) or glob[i + 3] == "/"):
            parts.append("(?:/.*)?")
            i += 3
        elif glob.startswith("**", i):
            parts.append(".*")
            i += 2
        elif glob[i] == "*":
            parts.append("[^/]*")
            i += 1
        else:
            parts.append(re.escape(glob[i]))
            i += 1
    # Case-insensitive: Express, IIS/ASP.NET and Spring (optionally) route case-insensitively.
    return re.compile("".join(parts) + "/?", re.IGNORECASE | re.ASCII | re.DOTALL)


@dataclass(frozen=True, slots=True)
class PathRule:
    """One `METHOD glob-path` entry. `*` stays within a segment, `**` spans segments; the
    method and the path match case-insensitively."""

    text: str
    method: str
    regex: re.Pattern[str]

    def matches_path(self, canonical_path: str) -> bool:
        return self.regex.fullmatch(canonical_path) is not None

    def matches(self, method: str, canonical_path: str) -> bool:
        if self.method != "*" and self.method != method.upper():
            return False
        return self.matches_path(canonical_path)


@functools.lru_cache(maxsize=1 << 16)
def parse_path_rule(text: str) -> PathRule:
    """Raises ValueError with a user-facing message. Cached (rules are immutable): the schema
    and the compiler both parse each entry, and large configs repeat the same few entries."""
    bits = text.split()
    if len(bits) == 1 and bits[0].startswith("/"):
        method, glob = "*", bits[0]
    elif len(bits) == 2:
        method, glob = bits
    else:
        raise ValueError(f"expected 'METHOD /path/glob', got {text!r}")
    if not _METHOD.match(method):
        raise ValueError(f"bad method {method!r} in {text!r}")
    if not glob.startswith("/"):
        raise ValueError(f"path glob must start with '/' in {text!r}")
    if "***" in glob:
        raise ValueError(f"'***' is not a glob in {text!r}")
    return PathRule(text, method.upper(), _glob_to_regex(normalise_path(glob)))
