"""Typed engine errors, so callers branch on "not found" / "conflict" instead of status codes.

Docker answers errors as `{"message": ...}`; Podman as `{"cause", "message", "response"}` and often
with 500 where Docker says 400 or 404. `error_from_response` maps both to the same classes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class EngineError(Exception):
    """The engine refused or failed a request (or failed inside a 200 stream)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        cause: str | None = None,
        operation: str | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.cause = cause
        self.operation = operation
        where = f"{operation}: " if operation else ""
        code = f"{status} " if status else ""
        super().__init__(f"engine: {where}{code}{message}".rstrip())


class BadRequest(EngineError):
    """400: the engine did not accept the parameters (Podman may say 500 for these)."""


class NotFound(EngineError):
    """404: no such container, image, volume, network or exec instance."""


class Conflict(EngineError):
    """409: name already in use, container running, object in use."""


class ServerError(EngineError):
    """5xx that is not a disguised 400/404/409."""


class EngineUnavailable(EngineError):
    """The socket did not answer (refused, reset, timed out): status 0."""


class StreamError(EngineError):
    """The engine's framed byte stream was malformed or ended mid-frame."""


@dataclass(frozen=True)
class Attempt:
    """One place discovery looked for an engine socket, and why it was not used."""

    source: str
    location: str
    reason: str | None = None  # None = this one worked

    def line(self) -> str:
        return f"{self.source}: {self.location}: {self.reason or 'ok'}"


class EngineNotFound(Exception):
    """No usable engine socket; carries every candidate tried, because "not found" alone is
    useless to someone whose engine lives somewhere unusual."""

    def __init__(
        self, summary: str, tried: Sequence[Attempt], *, authoritative: bool = False
    ) -> None:
        self.summary = summary
        self.tried = tuple(tried)
        self.authoritative = authoritative  # a user setting failed: nothing else may be used
        lines = "".join(f"\n  {a.line()}" for a in self.tried)
        super().__init__(f"{summary}{lines}")


# Podman answers some client mistakes with 500; its `cause` tells what it really was.
_PODMAN_CAUSES: tuple[tuple[str, type[EngineError]], ...] = (
    ("no such", NotFound),
    ("already in use", Conflict),
    ("already exists", Conflict),
    ("is running", Conflict),
    ("state improper", Conflict),
    ("is paused", Conflict),
    ("being used", Conflict),
    ("in use", Conflict),
    ("invalid", BadRequest),
    ("bad parameter", BadRequest),
    ("not supported", BadRequest),
)


def _class_for(status: int, cause: str | None, message: str) -> type[EngineError]:
    if status == 400:
        return BadRequest
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status >= 500:
        text = f"{cause or ''} {message}".lower()
        for needle, cls in _PODMAN_CAUSES:
            if needle in text:
                return cls
        return ServerError
    return EngineError


def error_from_response(status: int, body: bytes, *, operation: str | None = None) -> EngineError:
    """Build the typed error for a non-2xx answer from either engine's body shape."""
    cause: str | None = None
    message = ""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        message = str(data.get("message") or data.get("error") or "")
        raw_cause = data.get("cause")
        cause = str(raw_cause) if raw_cause else None
    if not message:
        message = body.decode("utf-8", "replace").strip()[:500] or "no message"
    cls = _class_for(status, cause, message)
    return cls(status, message, cause=cause, operation=operation)


def error_from_stream(item: dict[str, Any], *, operation: str | None = None) -> EngineError | None:
    """An `error`/`errorDetail` object inside a 200 progress stream (pull, build, import)."""
    detail = item.get("errorDetail")
    err = item.get("error")
    if not detail and not err:
        return None
    message = ""
    code = 0
    if isinstance(detail, dict):
        message = str(detail.get("message") or "")
        code = int(detail.get("code") or 0)
    if not message:
        message = str(err or detail)
    status = code if code >= 400 else 0  # build steps put the command's exit status here
    cls = _class_for(status, None, message) if status else EngineError
    if cls is EngineError and "not found" in message.lower():
        cls = NotFound
    return cls(status, message, operation=operation)
