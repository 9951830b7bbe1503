"""What every data plane shares: the compiled policy, the secret store, the audit writer, and
how to reach upstreams. Assembled once at start-up by `gateway.runtime.assemble`."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from gateway.audit.writer import AuditRecord, AuditWriter, Outcome, build_record
from gateway.config.loader import LoadedConfig
from gateway.credentials.redact import Redactor
from gateway.credentials.store import SecretStore
from gateway.planes.resources import ConnectionLimiter
from gateway.policy.core import Decision, Placeholder, Policy, RequestFacts
from gateway.policy.refusal import RefusalMode
from gateway.tls.ca import CertificateAuthority
from gateway.upstream.routes import Routes
from gateway.upstream.tls import UpstreamTLS

if TYPE_CHECKING:
    from gateway.credentials.oauth import TokenMinter
    from gateway.metrics import Metrics

# Mints (or reuses) the OAuth access tokens a plan needs before it is applied.
TokenPreparer = Callable[[frozenset[str]], Awaitable[None]]


@dataclass
class GatewayContext:
    config: LoadedConfig
    policy: Policy
    secrets: SecretStore
    audit: AuditWriter
    ca: CertificateAuthority
    state_dir: Path
    placeholders: tuple[Placeholder, ...]
    # Where upstream names are dialled (`upstream.resolve`, `upstream.nameservers`): reloaded.
    routes: Routes
    upstream_tls: UpstreamTLS  # not reloaded: `upstream.ca_bundle` needs a restart
    agent: str = "agent"
    prepare_tokens: TokenPreparer | None = None
    metrics: Metrics | None = None  # `keyward serve` counts every audit record here too
    extra: dict[str, Any] = field(default_factory=dict)
    # Agent connections held by both planes (`limits.max_connections*`, read per connection).
    connections: ConnectionLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.connections = ConnectionLimiter(lambda: self.config.config.limits)

    @property
    def redactor(self) -> Redactor:
        return self.secrets.redactor

    @property
    def refusal_mode(self) -> RefusalMode:
        """How denied requests are answered (`egress.refusal`), read per refusal."""
        return RefusalMode(self.config.config.egress.refusal)

    @functools.cached_property
    def oauth_names(self) -> frozenset[str]:
        """Which secrets are minted OAuth tokens (fixed once the store is loaded)."""
        return frozenset(self.secrets.oauth())

    def start_token_minter(self) -> TokenMinter:
        """OAuth tokens are minted on demand by the data planes; the caller closes it."""
        from gateway.credentials.oauth import TokenMinter

        minter = TokenMinter(
            self.secrets,
            self.state_dir,
            self.upstream_ssl_context,
            dial=self.dial_addresses,
            on_mint=self.metrics.token_mint if self.metrics is not None else None,
        )
        self.prepare_tokens = minter.ensure
        return minter

    def upstream_ssl_context(self) -> ssl.SSLContext:
        """The one verified TLS context to upstreams (service plane and token minter)."""
        return self.upstream_tls.context()

    def connect_target(self, host: str, port: int) -> tuple[str, int]:
        """Where a (verified) host:port is actually dialled: `upstream.resolve` or itself."""
        return self.routes.target(host, port)

    async def dial_addresses(
        self, host: str, port: int, *, via: tuple[str, int] | None = None
    ) -> list[tuple[str, int]]:
        """The checked addresses for `host`:`port` under the current routes and policy
        (`Routes.addresses`): the one dial path of every plane and the token minter."""
        return await self.routes.addresses(host, port, self.policy.address_refusal, via=via)

    async def resolver_for(self, decision: Decision) -> Callable[[str], str]:
        """The secret resolver for an allowed decision, minting OAuth tokens first if needed."""
        if decision.plan is not None and self.prepare_tokens is not None:
            oauth = decision.plan.secrets & self.oauth_names
            if oauth:
                await self.prepare_tokens(oauth)
        return self.secrets.resolve

    def record(
        self,
        facts: RequestFacts,
        decision: Decision | None,
        *,
        started: float,
        refusal: RefusalMode | None = None,
        policy: str | None = None,
        **outcome: Unpack[Outcome],
    ) -> AuditRecord:
        """Write one audit record for a request or refused connection. `policy` is the hash of
        the policy that decided (taken when it decided: a reload may have happened since)."""
        rec = build_record(
            facts,
            decision,
            started=started,
            agent=self.agent,
            policy=policy or self.config.digest,
            refusal=str(refusal) if refusal is not None else None,
            **outcome,
        )
        self.write_record(rec)
        return rec

    def write_record(self, rec: AuditRecord) -> None:
        """The one way a record is written (every plane and the DNS listener): the audit line,
        then the metrics, so the two always agree."""
        self.audit.write(rec)
        if self.metrics is not None:
            self.metrics.observe(
                plane=rec.plane,
                decision=rec.decision,
                reason=rec.reason,
                host=rec.host,
                status=rec.status,
                duration_ms=rec.duration_ms,
                injected=rec.injected,
            )
