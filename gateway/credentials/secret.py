"""A secret value that does not print, pickle, copy or hash itself.

Real credentials travel through logs, tracebacks, f-strings and debug dumps by accident far
more often than on purpose; wrapping them makes every accidental path print a marker instead.
"""

from __future__ import annotations

import hmac
from typing import Any, NoReturn, final

from gateway.cli.errors import EXIT_USAGE, KeywardError

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


class SecretError(KeywardError):
    """One secret could not be loaded. The message names the secret and its source, never a
    value (nor anything a command printed)."""

    exit_code = EXIT_USAGE

    def __init__(self, secret: str | None, source: str, problem: str) -> None:
        self.secret = secret
        self.source = source
        self.problem = problem
        where = f"{source} {problem}" if source else problem
        super().__init__(f"secret {secret!r}: {where}" if secret is not None else where)
