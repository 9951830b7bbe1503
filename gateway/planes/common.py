"""What every plane says the same way: the reasons a request is refused or fails (in the
`X-Keyward-Reason` header and the audit record), and the body, headers and status of an error
the gateway answers itself. Each plane only adapts these to its own response type."""

from __future__ import annotations

import json
from enum import StrEnum


class Reason(StrEnum):
    """Why a request failed or was turned away after the policy allowed it: stable strings
    that agents, `keyward log` and metrics key on."""

    UPSTREAM_ERROR = "upstream-error"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_TLS_ERROR = "upstream-tls-error"
    UPSTREAM_DNS_ERROR = "upstream-dns-error"
    UPSTREAM_CONNECT_ERROR = "upstream-connect-error"
    CLIENT_ABORTED = "client-aborted"
    BAD_REQUEST = "bad-request"


ERROR_MESSAGE = "keyward could not complete the request"


def error_status(reason: str, code: int = 502) -> int:
    """The status of a failed exchange: 504 when the upstream timed out, else `code`."""
    return 504 if reason == Reason.UPSTREAM_TIMEOUT else code


def error_body(reason: str) -> bytes:
    """The JSON body of an error the gateway answers itself."""
    return json.dumps({"error": ERROR_MESSAGE, "reason": reason}).encode()


def error_headers(reason: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Keyward-Reason": reason}
