"""The `keyward.yaml` schema (DESIGN §3). Strict: unknown keys are errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from gateway.policy.core import DEFAULT_SWAP_IN, SwapLocation
from gateway.policy.hosts import is_ip, normalise_host, parse_pattern, split_hostport
from gateway.policy.paths import parse_path_rule
from gateway.policy.templates import parse_template


def _url_host(url: str) -> str:
    """The host of an http(s) URL; a ValueError if it has none or carries odd characters."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("URL contains whitespace or a control character")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"bad URL: {e}") from None
    if not host:
        raise ValueError(f"{url!r} has no host name")
    if parts.username or parts.password:
        raise ValueError("URL must not carry credentials (user:password@)")
    normalise_host(host)
    return host


def _check_pattern(v: str) -> str:
    parse_pattern(v)
    return v


def _check_path_rule(v: str) -> str:
    parse_path_rule(v)
    return v


def _check_template(v: str) -> str:
    parse_template(v)
    return v


def _check_header_name(v: str) -> str:
    if not v or any(c in v for c in ' :\r\n\t()<>@,;\\"/[]?={}'):
        raise ValueError(f"bad header name {v!r}")
    return v


HostKey = Annotated[str, AfterValidator(_check_pattern)]
PathRuleText = Annotated[str, AfterValidator(_check_path_rule)]
TemplateText = Annotated[str, AfterValidator(_check_template)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvSource(Strict):
    env: str = Field(description="Environment variable (or .env entry next to the config)")


class FileSource(Strict):
    file: str = Field(description="File holding the value; trailing newline stripped")


class CommandSource(Strict):
    command: list[str] = Field(min_length=1, description="argv of a command printing the value")
    timeout: float = Field(10.0, gt=0, le=300, description="seconds before the command is killed")


def _source_kind(v: object) -> str | None:
    """Pick the source model by the key present, so errors speak of that one model only."""
    if isinstance(v, dict):
        for kind in ("env", "file", "command", "oauth"):
            if kind in v:
                return kind
        return None
    kinds: dict[type, str] = {
        EnvSource: "env",
        FileSource: "file",
        CommandSource: "command",
        OAuthSource: "oauth",
    }
    return kinds.get(type(v))


ValueSource = Annotated[
    Annotated[EnvSource, Tag("env")]
    | Annotated[FileSource, Tag("file")]
    | Annotated[CommandSource, Tag("command")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="expected one of the keys env, file, command",
    ),
]


class OAuthConfig(Strict):
    token_url: str = Field(
        description="https token endpoint; pinned here, never taken from a response"
    )
    grant: Literal["refresh_token", "client_credentials"]
    client_id: ValueSource
    client_secret: ValueSource | None = None
    refresh_token: ValueSource | None = None
    scopes: list[str] = Field(default_factory=list)
    skew_seconds: float = Field(60.0, ge=0, description="refresh this long before expiry")

    @field_validator("token_url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("token_url must be an https:// URL")
        _url_host(v)
        return v

    @model_validator(mode="after")
    def _grant_fields(self) -> OAuthConfig:
        if self.grant == "refresh_token" and self.refresh_token is None:
            raise ValueError("grant refresh_token needs a refresh_token source")
        if self.grant == "client_credentials" and self.client_secret is None:
            raise ValueError("grant client_credentials needs a client_secret source")
        return self


class OAuthSource(Strict):
    oauth: OAuthConfig


SecretSource = Annotated[
    Annotated[EnvSource, Tag("env")]
    | Annotated[FileSource, Tag("file")]
    | Annotated[CommandSource, Tag("command")]
    | Annotated[OAuthSource, Tag("oauth")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="expected one of the keys env, file, command, oauth",
    ),
]


class BasicAuth(Strict):
    username: TemplateText
    password: TemplateText


class HostRuleConfig(Strict):
    allow: bool = Field(True, description="false = explicit deny")
    headers: dict[HeaderName, TemplateText] = Field(
        default_factory=dict, description="header -> template; {name} = secret, {{ }} = brace"
    )
    basic: BasicAuth | None = None
    deny: list[PathRuleText] = Field(
        default_factory=list,
        description='"METHOD /glob/**" entries; method and path match case-insensitively, and a'
        " request is denied if any method it could mean (override headers, _method) is denied",
    )
    ambiguous_paths: Literal["reject", "allow"] = Field(
        "reject",
        description="where deny: is set, refuse paths servers read differently (%2F, %5C, \\, ;,"
        " %25, bad escapes, controls) with ambiguous-path; allow = match and send them canonical",
    )
    intercept: bool | None = Field(
        None, description="TLS interception; default: only where the rule needs it"
    )
    tcp: bool = Field(False, description="allow raw TCP passthrough (non-HTTP) to this host:port")
    plain_http: bool = Field(False, description="allow credentials over plain HTTP")
    dns_types: list[str] = Field(
        default_factory=list, description="extra DNS record types answered (default A/AAAA)"
    )
    private_addresses: Literal["refuse", "allow"] = Field(
        "refuse",
        description="allow = this host may be dialled at a loopback, private, link-local "
        "(metadata) or other special address; refused by default (README: Private addresses)",
    )

    @field_validator("dns_types")
    @classmethod
    def _dns_types(cls, v: list[str]) -> list[str]:
        return [t.upper() for t in v]


_DEFAULT_RULE = HostRuleConfig()


class EgressConfig(Strict):
    default: Literal["deny", "allow", "warn"] = Field(
        "deny", description='for hosts no rule matches; warn = allow, audited "would-deny"'
    )
    refusal: Literal["explain", "reset"] = Field(
        "explain",
        description="explain: complete a denied CONNECT and answer each request with a 403 "
        "naming what was refused and the keyward.yaml lines that would allow it; "
        "reset: refuse the CONNECT itself (403, no body the client shows)",
    )
    hosts: dict[HostKey, HostRuleConfig] = Field(default_factory=dict)

    @field_validator("hosts", mode="before")
    @classmethod
    def _none_is_empty(cls, v: object) -> object:
        """`host:` and `host: {}` are the default rule: one shared (frozen) instance, not a
        model built per host (most rules of a 200,000-host config)."""
        if isinstance(v, dict):
            return {k: (_DEFAULT_RULE if r is None or r == {} else r) for k, r in v.items()}
        return v

    @field_validator("hosts")
    @classmethod
    def _patterns(cls, v: dict[str, HostRuleConfig]) -> dict[str, HostRuleConfig]:
        seen: dict[tuple[object, ...], str] = {}
        for key in v:
            pattern = parse_pattern(key)
            norm = (pattern.kind, pattern.host, pattern.port, pattern.network)
            if norm in seen:
                raise ValueError(f"{key!r} is the same rule as {seen[norm]!r}")
            seen[norm] = key
        return v


class PlaceholderConfig(Strict):
    secret: str
    format: str | None = Field(
        None,
        description="fake's shape: sk, sk-proj, sk-ant, ghp, github_pat, xoxb, akia, jwt, generic",
    )
    swap_in: list[SwapLocation] = Field(
        default_factory=lambda: sorted(DEFAULT_SWAP_IN),
        description="where the placeholder is swapped for the real value; elsewhere it passes "
        "unchanged and the request is audited as an alert",
    )


class ServiceConfig(Strict):
    listen: int = Field(ge=0, lt=65536, description="port on 127.0.0.1 (0 = pick one)")
    upstream: str = Field(description="base URL requests are forwarded to")

    @field_validator("upstream")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("https://") or v.startswith("http://")):
            raise ValueError("upstream must be an http:// or https:// URL")
        _url_host(v)
        return v.rstrip("/")


class UpstreamConfig(Strict):
    ca_bundle: str | None = Field(None, description="extra CAs for upstream TLS")
    resolve: dict[str, str] = Field(
        default_factory=dict, description='"host:port" -> "ip:port", like curl --resolve'
    )
    nameservers: list[str] = Field(
        default_factory=list,
        description='"ip:port" DNS servers the gateway (and its DNS listener) asks instead of '
        "the system resolver, in turn (split DNS; tests)",
    )

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, v: list[str]) -> list[str]:
        for text in v:
            host, port = split_hostport(text)
            if port is None or not is_ip(host):
                raise ValueError(f"nameserver {text!r} must be ip:port")
        return v

    @field_validator("resolve")
    @classmethod
    def _resolve(cls, v: dict[str, str]) -> dict[str, str]:
        for key, target in v.items():
            for what, text in (("key", key), ("target", target)):
                if "://" in text:
                    raise ValueError(f"resolve {what} {text!r} is a URL: write host:port")
                host, port = split_hostport(text)
                if port is None or not host:
                    raise ValueError(f"resolve {what} {text!r} must be host:port")
        return v


class AuditConfig(Strict):
    path: str = Field("keyward-audit.jsonl", description='JSONL file; "-" = stderr')
    on_error: Literal["refuse", "continue"] = Field(
        "refuse",
        description="when a record cannot be written: refuse new requests (503) or continue",
    )


class LimitsConfig(Strict):
    """Request and connection limits, both planes: over one, the request is refused before
    anything is sent upstream (431 for header fields, 414 for the target, 503 for connections,
    with a reason)."""

    header_bytes: int = Field(
        65536, ge=1024, le=1 << 24, description="bytes of all request header names and values"
    )
    headers: int = Field(100, ge=8, le=10000, description="number of request header fields")
    url_bytes: int = Field(
        8192, ge=256, le=1 << 20, description="bytes of the request target (path and query)"
    )
    max_connections: int = Field(
        4096,
        ge=1,
        le=1 << 20,
        description="agent connections held at once, all listeners together; one more gets a"
        " 503 connection-limit (also capped by the fd limit: half of it, less a reserve)",
    )
    max_connections_per_client: int = Field(
        1024,
        ge=1,
        le=1 << 20,
        description="agent connections held at once from one client address (503 beyond)",
    )


class TimeoutsConfig(Strict):
    """Seconds, the same on both planes. Defaults fit LLM APIs: a model may think for minutes
    before its first byte, then stream with pauses."""

    connect: float = Field(10.0, gt=0, le=3600, description="TCP connect to an upstream")
    tls: float = Field(10.0, gt=0, le=3600, description="TLS handshake with an upstream")
    response_headers: float = Field(
        300.0, gt=0, le=86400, description="request sent -> response headers"
    )
    idle: float = Field(
        120.0, gt=0, le=86400, description="no byte of a body (either way) for this long"
    )
    request_headers: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="an agent connection's complete request headers, from its start or the end"
        " of its previous response (so also how long an idle keep-alive connection is kept)",
    )


class Config(Strict):
    version: Literal[1]
    secrets: dict[str, SecretSource] = Field(
        default_factory=dict,
        description="real credentials by name; only the gateway reads them",
    )
    egress: EgressConfig = Field(
        default_factory=EgressConfig, description="what the agent may reach, and what it gets"
    )
    placeholders: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], PlaceholderConfig
    ] = Field(
        default_factory=dict,
        description="env variable -> a fake value the agent holds, swapped on the secret's hosts",
    )
    services: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], ServiceConfig] = Field(
        default_factory=dict, description='plain-HTTP reverse-proxy routes ("base URL" mode)'
    )
    upstream: UpstreamConfig = Field(
        default_factory=UpstreamConfig, description="how the gateway reaches the world"
    )
    audit: AuditConfig = Field(default_factory=AuditConfig, description="the audit log")
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="request size and connection limits, both planes"
    )
    timeouts: TimeoutsConfig = Field(
        default_factory=TimeoutsConfig,
        description="seconds: connect, tls, response_headers, idle, request_headers",
    )


def config_schema() -> dict[str, Any]:
    """The JSON Schema of keyward.yaml, for editors (`keyward schema`, and the copy shipped in
    the package as gateway/config/keyward.schema.json)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "keyward.yaml"
    return schema
