"""The config a gateway elsewhere receives: every secret source rewritten to where that gateway
will find the value (a `.env` entry in an engine pair, a mounted Secret file in Kubernetes).

Secrets are resolved on the operator's machine; the shipped config never says where they came
from, and the values travel separately, each under its own key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

from gateway.config.loader import LoadedConfig
from gateway.credentials.store import SecretStore

OAUTH_FIELDS = ("client_id", "client_secret", "refresh_token")
_ENV_UNSAFE = re.compile(r"[^A-Z0-9_]")

# key -> the source mapping the shipped config holds for it, e.g. {"env": key}
SourceFor = Callable[[str], dict[str, Any]]


def secret_key(secret: str, sub: str | None = None) -> str:
    """The key a secret (or an OAuth field of one) is shipped under: `KEYWARD_SECRET_<NAME>`."""
    base = _ENV_UNSAFE.sub("_", secret.upper())
    if sub:
        base += "_" + _ENV_UNSAFE.sub("_", sub.upper())
    return f"KEYWARD_SECRET_{base}"


def shipped_config(
    loaded: LoadedConfig, store: SecretStore, source_for: SourceFor
) -> tuple[dict[str, Any], dict[str, str]]:
    """(the config as data with every source replaced by `source_for(key)`, key -> value)."""
    raw = yaml.safe_load(loaded.path.read_text(encoding="utf-8"))
    values: dict[str, str] = {}
    secrets_out: dict[str, Any] = {}
    oauth = store.oauth()
    for name, src in (raw.get("secrets") or {}).items():
        if isinstance(src, dict) and "oauth" in src:
            creds = oauth[name]
            new = dict(src["oauth"])
            for sub in OAUTH_FIELDS:
                value = getattr(creds, sub)
                if value is None:
                    new.pop(sub, None)
                    continue
                key = secret_key(name, sub)
                values[key] = value.reveal()
                new[sub] = source_for(key)
            secrets_out[name] = {"oauth": new}
        else:
            key = secret_key(name)
            values[key] = store.get(name).reveal()
            secrets_out[name] = source_for(key)
    if secrets_out:
        raw["secrets"] = secrets_out
    return raw, values
