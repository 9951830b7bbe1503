"""Every reason keyward gives for a decision, a refusal or a failure, in one enum.

The policy core, the data planes, the DNS listener and the audit record all speak these: the
value is what goes on the wire (`X-Keyward-Reason`, JSON refusal bodies, the audit `reason`), so
agents, `keyward log`, `audit replay` and metrics key on stable strings. A literal reason
anywhere else is a type error (`Decision.reason` and the audit record take `AnyReason`).

Some reasons carry what they are about (`path-denied: DELETE /repos/**`): a `DetailedReason`
is that wire text, still a `str`, with its `kind` (a member) and `detail` kept apart. Its own
layer (below the policy) because errors raised at layer 1 carry reasons too. The reference
table is in `docs/audit.md`; `tests/test_reasons.py` keeps the two equal.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # The policy's decisions (gateway.policy.core).
    RULE = "rule"
    NO_RULE = "no-rule"
    DEFAULT_ALLOW = "default-allow"
    WOULD_DENY = "would-deny"
    HOST_DENIED = "host-denied"
    PATH_DENIED = "path-denied"
    AMBIGUOUS_PATH = "ambiguous-path"
    AMBIGUOUS_FORM = "ambiguous-form"
    FORM_BODY_ENCODED = "form-body-encoded"
    FORM_LENGTH_REQUIRED = "form-length-required"
    FORM_TOO_LARGE = "form-too-large"
    FORM_BODY_PENDING = "form-body-pending"
    PLAIN_HTTP_CREDENTIALS = "plain-http-credentials"
    PLACEHOLDER_WRONG_HOST = "placeholder-wrong-host"
    BAD_HOST = "bad-host"
    BAD_METHOD = "bad-method"
    BAD_TARGET = "bad-target"
    HOST_MISMATCH = "host-mismatch"
    SNI_MISMATCH = "sni-mismatch"
    PRIVATE_ADDRESS = "private-address"
    BAD_NAME = "bad-name"
    TYPE_REFUSED = "type-refused"  # on the wire `<qtype>-refused`: see `type_refused`
    # Refused before the policy was asked (gateway.planes.outbound, the planes).
    AUTHORITY_MISMATCH = "authority-mismatch"
    URL_TOO_LONG = "url-too-long"
    BAD_HEADER_BYTES = "bad-header-bytes"
    TOO_MANY_HEADERS = "too-many-headers"
    HEADERS_TOO_LARGE = "headers-too-large"
    BAD_REQUEST = "bad-request"
    NON_HTTP_KILLED = "non-http-killed"
    UDP_KILLED = "udp-killed"
    CLIENT_TLS_REJECTED = "client-tls-rejected"
    # The gateway's own state.
    CONNECTION_LIMIT = "connection-limit"
    AUDIT_UNAVAILABLE = "audit-unavailable"
    GATEWAY_STOPPING = "gateway-stopping"
    CREDENTIALS_UNAVAILABLE = "credentials-unavailable"
    CLIENT_HEADERS_TIMEOUT = "client-headers-timeout"
    CLIENT_IDLE_TIMEOUT = "client-idle-timeout"
    CLIENT_ABORTED = "client-aborted"
    # The upstream, and what came back from it.
    UPSTREAM_ERROR = "upstream-error"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_TLS_ERROR = "upstream-tls-error"
    UPSTREAM_DNS_ERROR = "upstream-dns-error"
    UPSTREAM_CONNECT_ERROR = "upstream-connect-error"
    UNSCRUBBABLE_ENCODING = "unscrubbable-encoding"
    UNDECODABLE_BODY = "undecodable-body"
    DECOMPRESSION_LIMIT = "decompression-limit"
    SSE_EVENT_TOO_LARGE = "sse-event-too-large"
    BODY_LONGER_THAN_DECLARED = "body-longer-than-declared"
    # The DNS listener.
    MALFORMED = "malformed"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate-limited"
    INTERNAL_ERROR = "internal-error"
    NOT_A_QUERY = "not-a-query"
    OPCODE_NOT_IMPLEMENTED = "opcode-not-implemented"
    QUESTION_COUNT = "question-count"
    CLASS_REFUSED = "class-refused"
    NXDOMAIN_UPSTREAM = "nxdomain-upstream"
    NO_UPSTREAM_FOR_TYPE = "no-upstream-for-type"
    NO_DATA = "no-data"
    # The audit log itself.
    AUDIT_RECORDS_LOST = "audit-records-lost"
    ERROR = "error"  # a record with neither a decision nor a reason (should not happen)

    @property
    def kind(self) -> Reason:
        return self

    @property
    def detail(self) -> str:
        return ""

    def about(self, detail: str) -> DetailedReason:
        """This reason with what it is about: `path-denied: DELETE /repos/**`."""
        return DetailedReason(self, detail, f"{self.value}: {detail}")

    @classmethod
    def parse(cls, text: str) -> Reason | None:
        """The kind of a wire reason (a member, `kind: detail` or `<qtype>-refused`), or None
        for text no version of this enum wrote."""
        for candidate in (text, text.split(":", 1)[0]):
            try:
                return cls(candidate)
            except ValueError:
                pass
        if text.endswith("-refused") and text[: -len("-refused")].isalnum():
            return cls.TYPE_REFUSED
        return None


class DetailedReason(str):
    """A reason with its detail, on the wire as one string; built only from a member."""

    kind: Reason
    detail: str

    def __new__(cls, kind: Reason, detail: str, text: str) -> DetailedReason:
        self = super().__new__(cls, text)
        self.kind = kind
        self.detail = detail
        return self

    def __reduce__(self) -> tuple[object, ...]:
        return (DetailedReason, (self.kind, self.detail, str(self)))


# What a decision, a refusal or an audit record carries as its reason.
AnyReason = Reason | DetailedReason


def type_refused(qtype: str) -> DetailedReason:
    """A DNS record type no rule allows, on the wire as `<qtype>-refused` (`txt-refused`)."""
    low = qtype.lower()
    return DetailedReason(Reason.TYPE_REFUSED, low, f"{low}-refused")
