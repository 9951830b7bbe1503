"""What every plane says the same way: the body, headers and status of an error
the gateway answers itself. Each plane only adapts these to its own response type."""

from __future__ import annotations

import json

from gateway.reasons import AnyReason, Reason

__all__ = ["ERROR_MESSAGE", "Reason", "error_body", "error_headers", "error_status"]


ERROR_MESSAGE = "keyward could not complete the request"


def error_status(reason: AnyReason, code: int = 502) -> int:
    """The status of a failed exchange: 504 when the upstream timed out, else `code`."""
    return 504 if reason == Reason.UPSTREAM_TIMEOUT else code


def error_body(reason: AnyReason) -> bytes:
    """The JSON body of an error the gateway answers itself."""
    return json.dumps({"error": ERROR_MESSAGE, "reason": reason}).encode()


def error_headers(reason: AnyReason) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Keyward-Reason": reason}
