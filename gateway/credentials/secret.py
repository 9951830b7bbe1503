"""A secret value that does not print, pickle, copy or hash itself.

Real credentials travel through logs, tracebacks, f-strings and debug dumps by accident far
more often than on purpose; wrapping them makes every accidental path print a marker instead.
"""

from __future__ import annotations

import hmac
from typing import Any, NoReturn, final

REDACTED_TEXT = "<redacted>"


@final
class SecretValue:
    """Holds one secret string; `reveal()` is the only way to the value."""

    __slots__ = ("_SecretValue__value",)
    __value: str  # declared for the type checker; set through object.__setattr__
    __hash__ = None  # type: ignore[assignment]  # hashing by value would be an oracle

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("SecretValue wraps a str")
        object.__setattr__(self, "_SecretValue__value", value)

    def reveal(self) -> str:
        """The real value. Call it only where the value is written into a request."""
        return self.__value

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("SecretValue is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("SecretValue is immutable")

    def __repr__(self) -> str:
        return f"SecretValue({REDACTED_TEXT})"

    def __str__(self) -> str:
        return REDACTED_TEXT

    def __format__(self, spec: str) -> str:
        return REDACTED_TEXT

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValue):
            return NotImplemented
        return hmac.compare_digest(self.__value.encode(), other.__value.encode())

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("SecretValue cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be copied")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError("SecretValue cannot be copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be pickled")
