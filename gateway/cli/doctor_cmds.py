"""`keyward doctor`: check a user's set-up end to end and print each problem with its fix.

It changes nothing but creating the CA if there is none yet (as the first `keyward run`
would), and starts no gateway. The client checks run the user's own curl,
python3, node, git and npm with the environment `keyward run` gives an agent (built by the same
function), against a local HTTPS server whose certificate the keyward CA signed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.cli.config_cmds import add_config_option, explained_secret_errors
from gateway.cli.main import EXIT_FAILURE, EXIT_OK
from gateway.config.loader import LoadedConfig, load_config
from gateway.config.paths import config_path, state_dir
from gateway.errors import KeywardError
from gateway.tls.ca import CA_DIR, CERT_FILE, KEY_FILE, CertificateAuthority, write_bundle
from gateway.tls.trust import agent_env, is_proxy_var


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # False: needed only for some ways of running (pairs, --isolate)


def check_config(path: Path) -> tuple[Check, LoadedConfig | None]:
    try:
        loaded = load_config(path)
    except KeywardError as e:
        fix = (
            "run `keyward init` to write a starter" if not path.exists() else "edit the line named"
        )
        return Check("config", False, str(e), fix), None
    n = len(loaded.config.egress.hosts)
    return Check("config", True, f"{path}: valid, {n} host rules"), loaded


def check_secrets(loaded: LoadedConfig) -> Check:
    from gateway.credentials.sources import load_secrets

    names = list(loaded.config.secrets)
    try:
        with explained_secret_errors(loaded):
            load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)
    except KeywardError as e:
        *problems, hint = str(e).splitlines()
        return Check("secrets", False, "; ".join(problems), hint.removeprefix("hint: "))
    return Check("secrets", True, f"{len(names)} resolved: {', '.join(names) or 'none declared'}")


def check_ca(sdir: Path) -> tuple[Check, CertificateAuthority | None]:
    """The CA `keyward run` will use; created here if missing, exactly as the first run would."""
    ca_dir = sdir / CA_DIR
    fresh = not (ca_dir / KEY_FILE).exists() or not (ca_dir / CERT_FILE).exists()
    try:
        ca = CertificateAuthority.load_or_create(sdir)
    except KeywardError as e:
        return Check("CA", False, str(e), "follow the message above"), None
    left = (ca.not_after - ca.not_before).days
    made = "created now, " if fresh else ""
    return Check("CA", True, f"{ca.cert_path} ({made}{ca.subject}, {left} days valid)"), ca


# -- does each client trust the CA with the agent's environment? ------------------------------
PROBES: dict[str, tuple[list[str], str]] = {
    # name: (argv, the fix if it fails); {url} is the local HTTPS server
    "curl": (
        ["curl", "-sS", "-o", "/dev/null", "{url}"],
        "curl reads CURL_CA_BUNDLE; a `cacert` line in ~/.curlrc overrides it: remove it",
    ),
    "python": (
        [
            "python3",
            "-c",
            "import sys, urllib.request; urllib.request.urlopen(sys.argv[1])",
            "{url}",
        ],
        "python reads SSL_CERT_FILE; a sitecustomize or truststore setting may override it",
    ),
    "python-requests": (
        [
            "python3",
            "-c",
            "import sys\ntry:\n import requests\nexcept ImportError:\n sys.exit(3)\n"
            "requests.get(sys.argv[1])",
            "{url}",
        ],
        "requests reads REQUESTS_CA_BUNDLE; a `verify=` argument in the agent's code overrides it",
    ),
    "node": (
        [
            "node",
            "-e",
            "require('https').get(process.argv[1], r => process.exit(0))"
            ".on('error', e => { console.error(e.message); process.exit(1) })",
            "{url}",
        ],
        "node reads NODE_EXTRA_CA_CERTS only at start: it must be set before node starts",
    ),
    "git": (
        ["git", "ls-remote", "{url}/doctor.git"],
        "git reads GIT_SSL_CAINFO; `http.sslCAInfo` or `http.sslVerify` in ~/.gitconfig win",
    ),
    "npm": (
        ["npm", "ping", "--registry", "{url}/", "--fetch-retries", "0", "--cache", "{tmp}/npm"],
        "npm reads NPM_CONFIG_CAFILE; only a --cafile/--ca on npm's command line wins over it",
    ),
}
TLS_WORDS = ("certificate", "ssl", "cert_", "self_signed", "self-signed", "unable_to_verify")


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def _https_server(ca: CertificateAuthority, tmp: Path) -> Iterator[str]:
    """127.0.0.1 HTTPS with a `localhost` certificate the keyward CA signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    store = ca.mitmproxy_certstore()
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    entry = store.get_cert("localhost", sans)
    pem = tmp / "leaf.pem"
    pem.touch(0o600)
    pem.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + entry.cert.to_pem()
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def probe_env(bundle: Path) -> dict[str, str]:
    """What `keyward run` gives an agent, minus the proxy (the probe server is local)."""
    env = {k: v for k, v in os.environ.items() if not is_proxy_var(k)}
    env.update(agent_env(str(bundle)))
    return env


def check_clients(ca: CertificateAuthority, scratch: Path) -> list[Check]:
    bundle = write_bundle(ca, scratch / "agent-ca-bundle.pem")
    env = probe_env(bundle)
    checks: list[Check] = []
    with (
        tempfile.TemporaryDirectory(prefix="keyward-doctor-") as t,
        _https_server(ca, Path(t)) as url,
    ):
        for name, (argv, fix) in PROBES.items():
            if shutil.which(argv[0]) is None:
                continue  # not installed: nothing the agent could run either
            cmd = [a.replace("{url}", url).replace("{tmp}", t) for a in argv]
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                checks.append(Check(f"trust: {name}", False, "no answer in 60 s", fix))
                continue
            if name == "python-requests" and r.returncode == 3:
                continue  # the agent's python has no requests
            out = (r.stderr + r.stdout).lower()
            tls_failed = any(w in out for w in TLS_WORDS)
            # git and npm fail on the probe's reply itself; only a TLS complaint counts
            ok = not tls_failed if name in ("git", "npm") else r.returncode == 0 and not tls_failed
            said = [x for x in r.stderr.splitlines() if x.strip()] or [f"exit {r.returncode}"]
            detail = "trusts the keyward CA" if ok else said[0][:200]
            checks.append(Check(f"trust: {name}", ok, detail, "" if ok else fix))
    return checks


def check_engine() -> Check:
    from gateway.engine.discovery import find_engine
    from gateway.engine.errors import EngineNotFound

    try:
        found = find_engine()
    except EngineNotFound as e:
        fix = "start Docker or Podman, or set DOCKER_HOST (see `keyward engine`)"
        return Check("engine", False, e.summary, fix, required=False)
    return Check("engine", True, f"{found.socket_path} ({found.how})", required=False)


def check_isolate() -> Check:
    missing = [t for t in ("ip", "iptables", "setpriv") if shutil.which(t) is None]
    if missing:
        fix = "install iproute2, iptables (nf_tables) and util-linux"
        return Check("isolate", False, f"missing {', '.join(missing)}", fix, required=False)
    if os.geteuid() != 0:
        return Check("isolate", False, "needs root", "run it with sudo", required=False)
    out = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout
    if "legacy" in out:
        fix = "switch to the nf_tables backend (update-alternatives --set iptables ...-nft)"
        return Check("isolate", False, out.strip(), fix, required=False)
    return Check("isolate", True, "root, ip, iptables (nf_tables), setpriv", required=False)


def run_checks(config: str | None, state: str | None) -> list[Check]:
    checks: list[Check] = []
    check, loaded = check_config(config_path(config))
    checks.append(check)
    if loaded is not None:
        checks.append(check_secrets(loaded))
    if state or os.environ.get("KEYWARD_STATE"):
        check, ca = check_ca(state_dir(state))
    else:  # what `keyward run` does without --state
        ca = CertificateAuthority.ephemeral()
        detail = "keyward run makes one in memory for each run (--state DIR keeps one in DIR/ca)"
        check = Check("CA", True, detail)
    checks.append(check)
    if ca is not None:
        with tempfile.TemporaryDirectory(prefix="keyward-doctor-") as t:
            checks.extend(check_clients(ca, Path(t)))
    checks.append(check_engine())
    checks.append(check_isolate())
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.config, args.state)
    failed = [c for c in checks if c.required and not c.ok]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
        return EXIT_FAILURE if failed else EXIT_OK
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "skip")
        print(f"{mark} {c.name}: {c.detail}")
        if c.fix and not c.ok:
            print(f"     fix: {c.fix}")
    if failed:
        print(f"{len(failed)} problem(s) to fix before `keyward run`", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check this set-up end to end and print each fix")
    add_config_option(p)
    p.add_argument("--state", metavar="DIR", help="state dir (default $KEYWARD_STATE)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_doctor)
