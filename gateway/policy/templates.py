"""Header templates: `Bearer {openai}` names a secret, `{{`/`}}` are literal braces.

Parsing happens at config load; rendering needs a resolver that only the credential store can
supply, so a template on its own can never reveal anything.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str


@dataclass(frozen=True, slots=True)
class Template:
    text: str
    parts: tuple[str | SecretRef, ...]

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if isinstance(p, SecretRef))

    def render(self, resolve: Callable[[str], str]) -> str:
        return "".join(p if isinstance(p, str) else resolve(p.name) for p in self.parts)


@functools.lru_cache(maxsize=1 << 16)
def parse_template(text: str) -> Template:
    """Raises ValueError naming the offending column, never echoing a value. Cached (templates
    are immutable and name secrets, never hold them): many hosts share one template."""
    for i, ch in enumerate(text):
        if ch in "\r\n\0":
            # a line break in a header value would start a second header (or request) upstream
            raise ValueError(f"line break or NUL at column {i + 1} (not allowed in a header)")
    parts: list[str | SecretRef] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "{":
            if text.startswith("{{", i):
                buf.append("{")
                i += 2
                continue
            end = text.find("}", i)
            if end < 0:
                raise ValueError(
                    f"unclosed '{{' at column {i + 1} (write '{{{{' for a literal brace)"
                )
            name = text[i + 1 : end]
            if not _NAME.fullmatch(name):
                raise ValueError(f"bad secret reference at column {i + 1}: expected {{name}}")
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(SecretRef(name))
            i = end + 1
        elif ch == "}":
            if text.startswith("}}", i):
                buf.append("}")
                i += 2
                continue
            raise ValueError(f"stray '}}' at column {i + 1} (write '}}}}' for a literal brace)")
        else:
            buf.append(ch)
            i += 1
    if buf:
        parts.append("".join(buf))
    return Template(text, tuple(parts))
