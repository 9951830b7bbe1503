"""Which methods a request could mean to the upstream.

Frameworks take the method from more places than the request line: the `X-HTTP-Method-Override`,
`X-HTTP-Method` and `X-Method-Override` headers (Express method-override, Symfony, ASP.NET, Google
APIs), a `_method` query parameter (Laravel, Symfony, Express with a getter; ASP.NET also reads
`X-HTTP-Method-Override` there and in forms), a `_method` form field (Rails' Rack::MethodOverride,
Laravel, Symfony; urlencoded and multipart alike), and a HEAD is served by the GET handler (Flask,
Go's ServeMux, Express). Method names are read case-insensitively (Werkzeug upper-cases them). A
deny rule holds if any of these meanings is denied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
OVERRIDE_PARAMS = frozenset({"_method", *OVERRIDE_HEADERS})
# A form body is read before deciding only up to this size (and only when it could matter).
FORM_BODY_LIMIT = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")
_STRIP = " \t\r\n\x00\x0b\x0c"
_MAY_OVERRIDE = re.compile(r"method|%", re.IGNORECASE)
_PARAM_SPLIT = re.compile(r"[&;]")
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*("([^"]*)"|[^;,\s]*)', re.IGNORECASE)
_PART_NAME = re.compile(rb'\bname(\*?)\s*=\s*("([^"]*)"|[^;\s]*)', re.IGNORECASE)


def is_token(method: str) -> bool:
    """RFC 9110 method syntax: anything else (spaces, CR/LF, NUL) is refused, never guessed."""
    return _TOKEN.fullmatch(method) is not None


def meaning(value: str) -> str:
    """How a lenient server reads a method name: trimmed, upper-cased."""
    return value.strip(_STRIP).upper()


def meanings(method: str, overrides: Iterable[str] = ()) -> tuple[str, ...]:
    """Every method the request could mean, the request line's first."""
    out = dict.fromkeys([meaning(method)])
    for value in overrides:
        for part in (value, *value.split(",")):
            m = meaning(part)
            if m:
                out[m] = None
    if "HEAD" in out:
        out["GET"] = None  # HEAD runs the GET handler
    return tuple(out)


def _param_overrides(text: str, plus: bool = True) -> list[str]:
    """Override values among `name=value` pairs split on & and ; (Rack splits on both)."""
    if not _MAY_OVERRIDE.search(text):
        return []
    decode = unquote_plus if plus else unquote
    out: list[str] = []
    for pair in _PARAM_SPLIT.split(text):
        name, _, value = pair.partition("=")
        name = decode(name).strip(_STRIP).lower().split("[", 1)[0]
        if name in OVERRIDE_PARAMS:
            out.append(decode(value))
    return out


def query_overrides(query: str) -> list[str]:
    """Override values in a query (`?...`, fragment included: parsers disagree on it)."""
    return _param_overrides(query.removeprefix("?"))


def form_kind(content_type: str) -> str | None:
    """ "urlencoded", "multipart" or None, from a (possibly repeated) Content-Type."""
    low = content_type.lower()
    if "x-www-form-urlencoded" in low:
        return "urlencoded"
    if "multipart/" in low:
        return "multipart"
    return None


def form_overrides(content_type: str, body: bytes) -> list[str] | None:
    """Override values in a form body; None if it cannot be read one way (then refuse)."""
    kind = form_kind(content_type)
    if kind == "urlencoded":
        return _param_overrides(body.decode("latin-1"))
    if kind != "multipart":
        return []
    boundaries = {m.group(2) if m.group(2) is not None else m.group(1)
                  for m in _BOUNDARY.finditer(content_type)}  # fmt: skip
    if len(boundaries) != 1 or not next(iter(boundaries)):
        return None
    delimiter = b"--" + next(iter(boundaries)).encode("latin-1")
    parts = body.split(delimiter)
    if len(parts) < 3 or parts[0].strip(b"\r\n") or not parts[-1].startswith(b"--"):
        return None  # no opening or closing delimiter, or a preamble parsers treat differently
    out: list[str] = []
    for part in parts[1:-1]:
        head, sep, value = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            head, sep, value = part.lstrip(b"\r\n").partition(b"\n\n")
        for m in _PART_NAME.finditer(head):
            raw = m.group(3) if m.group(3) is not None else m.group(2)
            name = raw.decode("latin-1")
            if m.group(1):  # RFC 2231: name*=utf-8''%5Fmethod
                name = name.split("'", 2)[-1]
            name = unquote(name)  # browsers percent-encode names; some parsers decode them
            if name.strip(_STRIP).lower().split("[", 1)[0] in OVERRIDE_PARAMS:
                out.append(value.rstrip(b"\r\n").decode("latin-1"))
    return out


@dataclass(frozen=True, slots=True)
class MethodSignals:
    """What besides the request line can change the method an upstream acts on."""

    overrides: tuple[str, ...] = ()  # values of the override headers
    content_type: str = ""
    content_length: int | None = None  # None: absent, repeated or not a number
    content_encoding: str = ""
    body: bytes | None = None  # read only when a decision asked for it (`Decision.body_limit`)

    @classmethod
    def from_headers(cls, get_all: Callable[[str], Iterable[str]]) -> MethodSignals:
        """Read from a header multimap's `get_all(name)` (six lookups, no copy of the rest)."""
        overrides = tuple(v for name in OVERRIDE_HEADERS for v in get_all(name))
        lengths = list(get_all("content-length"))
        sized = len(lengths) == 1 and _DIGITS.fullmatch(lengths[0].strip())
        length = int(lengths[0]) if sized else None
        return cls(
            overrides,
            ", ".join(get_all("content-type")),
            length,
            ", ".join(get_all("content-encoding")),
        )


NO_SIGNALS = MethodSignals()
