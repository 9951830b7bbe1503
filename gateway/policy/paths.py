"""Request-path normalisation and `METHOD glob-path` rules.

Paths are normalised before matching so that `/repos/../repos/a/b`, `//repos/a/b` and
`/%72epos/a/b` cannot dodge a rule written for `/repos/**`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_METHOD = re.compile(r"^[A-Za-z*]+$")


def _decode_unreserved(m: re.Match[str]) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else "%" + m.group(1).upper()


def normalise_path(path: str) -> str:
    """Drop query/fragment, decode unreserved escapes, collapse `//`, resolve `.` and `..`."""
    for sep in "?#":
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if "%" in path:
        path = _PCT.sub(_decode_unreserved, path)
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = "/" if path.endswith("/") and out else ""
    return "/" + "/".join(out) + trailing


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
    return re.compile("".join(parts) + "/?")


@dataclass(frozen=True, slots=True)
class PathRule:
    """One `METHOD glob-path` entry. `*` stays within a segment, `**` spans segments."""

    text: str
    method: str
    regex: re.Pattern[str]

    def matches(self, method: str, normalised_path: str) -> bool:
        if self.method != "*" and self.method != method:
            return False
        return self.regex.fullmatch(normalised_path) is not None


def parse_path_rule(text: str) -> PathRule:
    """Raises ValueError with a user-facing message."""
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
