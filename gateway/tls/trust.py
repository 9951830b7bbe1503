"""What an agent needs to trust the gateway CA without changing its image."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gateway.tls.ca import CertificateAuthority, write_bundle

# Every trust variable some client reads (LESSONS.md): all point at one combined bundle.
CA_ENV_VARS = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
    "CARGO_HTTP_CAINFO",
    "NPM_CONFIG_CAFILE",  # beats a user's own npm `cafile`, which hides NODE_EXTRA_CA_CERTS
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
)
# Explicit-proxy mode: every spelling some client reads (curl only the lower-case http_proxy).
PROXY_ENV_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# Loopback, in every form a client may write it: `services:` routes are reached directly.
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"
# Where agents' images keep their system bundle: mount ca-bundle.crt over it read-only.
SYSTEM_BUNDLE_PATHS = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)


def agent_env(
    bundle: str, proxy_url: str | None = None, *, bypass_loopback: bool = False
) -> dict[str, str]:
    """The one builder of the agent's trust and proxy variables, for `keyward run` and the
    pod's trust.env alike: the combined bundle for every CA variable; with `proxy_url`
    (explicit-proxy mode) the proxy in both spellings, and Node told to honour it."""
    env = dict.fromkeys(CA_ENV_VARS, bundle)
    if proxy_url is not None:
        for name in PROXY_ENV_VARS:
            env[name] = env[name.lower()] = proxy_url
        env["NODE_USE_ENV_PROXY"] = "1"  # Node >= 22.21 / 24.5: fetch and https use the proxy
        if bypass_loopback:
            env["NO_PROXY"] = env["no_proxy"] = LOOPBACK_NO_PROXY
    return env


def is_proxy_var(name: str) -> bool:
    """A variable that would route the agent's traffic somewhere (dropped before ours are set)."""
    return name.upper() in (*PROXY_ENV_VARS, "NO_PROXY")


def entrypoint_script() -> str:
    return resources.files("gateway.pod").joinpath("agent-entrypoint.sh").read_text()


def render_agent_trust(ca: CertificateAuthority, out: Path, bundle_in_agent: str) -> list[Path]:
    """Write ca.crt, ca-bundle.crt, trust.env, agent-entrypoint.sh into `out`. Never the key."""
    out.mkdir(parents=True, exist_ok=True)
    crt = out / "ca.crt"
    crt.write_bytes(ca.cert_pem)
    bundle = write_bundle(ca, out / "ca-bundle.crt")
    env = out / "trust.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in agent_env(bundle_in_agent).items()))
    script = out / "agent-entrypoint.sh"
    script.write_text(entrypoint_script())
    script.chmod(0o755)
    for p in (crt, bundle, env):
        p.chmod(0o644)
    return [crt, bundle, env, script]
