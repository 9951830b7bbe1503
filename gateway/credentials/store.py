"""The in-memory home of every loaded secret and minted OAuth token, for one gateway process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gateway.config.model import OAuthConfig
from gateway.credentials.redact import Redactor, global_redactor
from gateway.credentials.secret import SecretValue
from gateway.errors import StaleTokenError


@dataclass(frozen=True, eq=False)
class OAuthCredentials:
    """What a token minter needs for one OAuth secret: the pinned config and its loaded inputs."""

    name: str
    config: OAuthConfig
    client_id: SecretValue
    client_secret: SecretValue | None = None
    refresh_token: SecretValue | None = None


@dataclass(frozen=True, eq=False)
class _Minted:
    value: SecretValue
    expires_at: float


class SecretStore:
    """Secret values by name. `resolve` is the resolver handed to `apply_plan`; nothing else in
    the gateway needs a plain string."""

    def __init__(
        self,
        values: Mapping[str, SecretValue] | None = None,
        *,
        oauth: Mapping[str, OAuthCredentials] | None = None,
        env_vars: Iterable[str] = (),
        redactor: Redactor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # wall clock for token expiry; the token minter shares it
        self._values: dict[str, SecretValue] = dict(values or {})
        self._oauth: dict[str, OAuthCredentials] = dict(oauth or {})
        overlap = self._values.keys() & self._oauth.keys()
        if overlap:
            raise ValueError(f"secret defined twice: {', '.join(sorted(overlap))}")
        self._env_vars = frozenset(env_vars)
        self._minted: dict[str, _Minted] = {}
        self._lock = threading.Lock()
        self.redactor = redactor if redactor is not None else Redactor()
        known = [v.reveal() for v in self._values.values()]
        for cred in self._oauth.values():
            fields = (cred.client_id, cred.client_secret, cred.refresh_token)
            known += [f.reveal() for f in fields if f is not None]
        self._remember(*known)

    def _remember(self, *values: str) -> None:
        self.redactor.update(values)
        global_redactor().update(values)

    def names(self) -> frozenset[str]:
        return frozenset(self._values) | frozenset(self._oauth)

    def __contains__(self, name: object) -> bool:
        return name in self._values or name in self._oauth

    def get(self, name: str) -> SecretValue:
        """The value of a static secret, or the current (unexpired) token of an OAuth one."""
        if name in self._values:
            return self._values[name]
        if name in self._oauth:
            return self._current_token(name)
        raise KeyError(f"unknown secret {name!r}")

    def resolve(self, name: str) -> str:
        """Plain value for `apply_plan`. An expired or never-minted OAuth token raises
        `StaleTokenError`: a request is refused rather than sent with a stale token."""
        return self.get(name).reveal()

    def _current_token(self, name: str) -> SecretValue:
        minted = self._minted.get(name)
        grant = self._oauth[name].config.grant
        if minted is None:
            raise StaleTokenError(name, f"oauth {grant}", "has no access token minted yet")
        if self.clock() >= minted.expires_at:
            raise StaleTokenError(name, f"oauth {grant}", "access token has expired")
        return minted.value

    def env_vars(self) -> frozenset[str]:
        """Every environment variable a secret (or OAuth input) was read from, so a child
        process can be started without them."""
        return self._env_vars

    def oauth(self) -> dict[str, OAuthCredentials]:
        return dict(self._oauth)

    def minted(self, name: str) -> tuple[SecretValue, float] | None:
        """The last minted token of an OAuth secret and its expiry (epoch seconds), if any."""
        if name not in self._oauth:
            raise KeyError(f"{name!r} is not an oauth secret")
        m = self._minted.get(name)
        return (m.value, m.expires_at) if m is not None else None

    def set_minted(self, name: str, value: str, expires_at: float) -> None:
        """Install a freshly minted access token; it is redacted everywhere from now on."""
        if name not in self._oauth:
            raise KeyError(f"{name!r} is not an oauth secret")
        if not value:
            raise ValueError(f"empty access token for {name!r}")
        self._remember(value)
        with self._lock:
            self._minted[name] = _Minted(SecretValue(value), float(expires_at))

    def register_placeholders(self, values: Iterable[str]) -> None:
        """Placeholder values are redacted from audit records and logs like real ones."""
        self._remember(*values)
