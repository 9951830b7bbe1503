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
)
# Where agents' images keep their system bundle: mount ca-bundle.crt over it read-only.
SYSTEM_BUNDLE_PATHS = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)


def entrypoint_script() -> str:
    return resources.files("gateway.pod").joinpath("agent-entrypoint.sh").read_text()


def render_agent_trust(ca: CertificateAuthority, out: Path, bundle_in_agent: str) -> list[Path]:
    """Write ca.crt, ca-bundle.crt, trust.env, agent-entrypoint.sh into `out`. Never the key."""
    out.mkdir(parents=True, exist_ok=True)
    crt = out / "ca.crt"
    crt.write_bytes(ca.cert_pem)
    bundle = write_bundle(ca, out / "ca-bundle.crt")
    env = out / "trust.env"
    env.write_text("".join(f"{name}={bundle_in_agent}\n" for name in CA_ENV_VARS))
    script = out / "agent-entrypoint.sh"
    script.write_text(entrypoint_script())
    script.chmod(0o755)
    for p in (crt, bundle, env):
        p.chmod(0o644)
    return [crt, bundle, env, script]
