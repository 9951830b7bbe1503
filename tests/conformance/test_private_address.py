"""Attack class: an allowed *name* that resolves to a loopback, private or metadata address
(DESIGN §7.7). Wildcards over names anyone can register, DNS rebinding and compromised zones
all end the same way: the gateway dials something on the inside on the agent's behalf.

Every attack here gets its own resolver answers from a test DNS server, never real DNS:
- under `keyward run` on this machine, through `upstream.nameservers` (a loopback DNS server);
- in a namespace of its own (root), through `/etc/netns/NAME/resolv.conf`: the gateway uses the
  system resolver there exactly as for a real user, and a "public" host sits on a documentation
  address inside that namespace, so a rebinding name can answer public first, private next;
- in the pod (root), the gateway (DNS listener included) asks a DNS server in the upstream
  namespace, through the pod namespace's `/etc/netns/NAME/resolv.conf`.
Nothing is ever sent to a private address outside loopback: the pod tests count, with an
iptables rule that drops and counts, every packet headed for the metadata or RFC 1918 address.

A listener on the private side records every connection it accepts: the attack has failed when
it saw none (the refusal came before any connect), and the agent got a 403 (or, from the DNS
listener, no address) with reason `private-address`, audited with the name and the address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.pod.isolate import IsolatedPod
from gateway.pod.netns import NetNamespace, Topology
from tests.support.addr_servers import Recorder, ZoneServer

ROOT = Path(__file__).resolve().parents[2]
KEYWARD = [sys.executable, "-m", "gateway"]
CURL = shutil.which("curl")
REASON = "private-address"

pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_env(state: Path, **extra: str) -> dict[str, str]:
    """This environment without proxy variables, for a gateway with its own state dir."""
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.update(KEYWARD_STATE=str(state), PYTHONPATH=str(ROOT), **extra)
    return env


def read_audit(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def refused(records: list[dict[str, object]], host: str) -> list[dict[str, object]]:
    return [r for r in records if r["host"] == host and r["reason"] == REASON]


# -- under `keyward run` on this machine (explicit proxy), answers via upstream.nameservers --

RUN_CONFIG = """version: 1
secrets:
  tok:
    oauth:
      token_url: "https://auth.allowed.test:{trap}/token"
      grant: client_credentials
      client_id: {{ env: CID }}
      client_secret: {{ env: CSECRET }}
egress:
  default: {default}
  hosts:
    "*.allowed.test": {{}}
    "api.oauth.test": {{ headers: {{ Authorization: "Bearer {{tok}}" }}, plain_http: true }}
    "localhost:{ok_localhost}": {{}}
    "127.0.0.1:{ok_literal}": {{}}
    "127.0.0.8/29": {{}}
    internal.corp.test: {{ private_addresses: allow }}
    "resolved.example.test": {{}}
services:
  trapped: {{ listen: {svc_trap}, upstream: "http://internal.allowed.test:{trap}" }}
  model: {{ listen: {svc_ok}, upstream: "http://localhost:{ok_localhost}" }}
  oauthed: {{ listen: {svc_oauth}, upstream: "http://api.oauth.test" }}
upstream:
  nameservers: ["127.0.0.1:{dns}"]
  resolve:
    "resolved.example.test:80": "127.0.0.1:{ok_resolve}"
    "api.oauth.test:80": "127.0.0.1:{ok_resolve}"
audit:
  path: audit.jsonl
"""

ZONE = {
    "internal.allowed.test": {"A": [["127.0.0.1"]]},
    "auth.allowed.test": {"A": [["127.0.0.1"]]},
    "mapped.allowed.test": {"AAAA": [["::ffff:127.0.0.1"]]},
    "internal.corp.test": {"A": [["127.0.0.1"]]},
}


@dataclass
class RunWorld:
    dir: Path
    config: Path
    trap: Recorder  # a loopback service the agent must never reach through keyward
    ok: dict[str, Recorder]
    ports: dict[str, int]

    def audit(self) -> list[dict[str, object]]:
        return read_audit(self.dir / "audit.jsonl")

    async def curl(self, *args: str) -> tuple[int, str, str]:
        """`keyward run -- curl ...`: prints the body, then a line `status reason-header`."""
        argv = [*KEYWARD, "run", "-c", str(self.config), "--", "curl", "-sS", "--max-time", "20"]
        argv += ["-w", "\n%{http_code} %header{x-keyward-reason}", *args]
        env = gateway_env(self.dir / "state", CID="c", CSECRET="s")
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


@pytest.fixture(params=["deny", "allow"])
async def run_world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunWorld]:
    dns = ZoneServer(ZONE)
    trap = Recorder("private")
    ok = {
        "localhost": Recorder("ok-localhost"),
        "literal": Recorder("ok-literal"),
        "cidr": Recorder("ok-cidr", host="127.0.0.9"),
        "corp": Recorder("ok-corp"),
        "resolve": Recorder("ok-resolve"),
    }
    ports = {"dns": await dns.start(), "trap": await trap.start()}
    for name, rec in ok.items():
        ports[f"ok_{name}"] = await rec.start()
    ports.update(svc_trap=free_port(), svc_ok=free_port(), svc_oauth=free_port())
    config = tmp_path / "keyward.yaml"
    config.write_text(RUN_CONFIG.format(default=request.param, **ports))
    try:
        yield RunWorld(tmp_path, config, trap, ok, ports)
    finally:
        for server in (dns, trap, *ok.values()):
            await server.close()


def status_of(out: str) -> tuple[str, str]:
    code, _, reason = out.rpartition("\n")[2].partition(" ")
    return code, reason


async def test_wildcard_name_to_loopback_mitm_plain_http(run_world: RunWorld) -> None:
    port = run_world.ports["trap"]
    _, out, err = await run_world.curl(f"http://internal.allowed.test:{port}/")
    assert status_of(out) == ("403", REASON), err
    assert run_world.trap.connects == []
    [rec] = refused(run_world.audit(), "internal.allowed.test")
    assert rec["addr"] == "127.0.0.1" and rec["decision"] == "deny"


async def test_wildcard_name_to_loopback_mitm_https(run_world: RunWorld) -> None:
    """The rule needs nothing from inside TLS, so it would pass through: the guard makes the
    gateway intercept instead, and answer the refusal inside the tunnel."""
    port = run_world.ports["trap"]
    _, out, err = await run_world.curl(f"https://internal.allowed.test:{port}/")
    assert status_of(out) == ("403", REASON), err
    assert run_world.trap.connects == []
    assert refused(run_world.audit(), "internal.allowed.test")


async def test_ipv4_mapped_ipv6_answer_to_loopback(run_world: RunWorld) -> None:
    port = run_world.ports["trap"]
    _, out, err = await run_world.curl(f"http://mapped.allowed.test:{port}/")
    assert status_of(out) == ("403", REASON), err
    assert run_world.trap.connects == []
    [rec] = refused(run_world.audit(), "mapped.allowed.test")
    assert ipaddress.ip_address(str(rec["addr"])) == ipaddress.ip_address("::ffff:127.0.0.1")


async def test_ip_literals_of_loopback_without_a_rule(run_world: RunWorld) -> None:
    """Even where `default: allow` lets unknown hosts through, loopback needs a rule.
    (`--noproxy ''`: `keyward run` exempts loopback from the proxy; this agent ignores that.)"""
    port = run_world.ports["trap"]
    for url in (f"http://127.0.0.1:{port}/", f"http://[::ffff:127.0.0.1]:{port}/"):
        _, out, err = await run_world.curl("--noproxy", "", url)
        assert status_of(out)[0] == "403", (url, err)
    assert run_world.trap.connects == []


async def test_wildcard_name_to_loopback_service_plane(run_world: RunWorld) -> None:
    _, out, err = await run_world.curl(f"http://127.0.0.1:{run_world.ports['svc_trap']}/v1/x")
    assert status_of(out) == ("403", REASON), err
    assert run_world.trap.connects == []
    [rec] = refused(run_world.audit(), "internal.allowed.test")
    assert rec["addr"] == "127.0.0.1" and rec["plane"] == "service"


async def test_oauth_token_endpoint_name_to_loopback(run_world: RunWorld) -> None:
    """The token minter dials through the same guard: the client secret never leaves."""
    _, out, err = await run_world.curl(f"http://127.0.0.1:{run_world.ports['svc_oauth']}/")
    assert status_of(out)[0] == "502", err
    assert "private-address" in err or "private-address" in json.dumps(run_world.audit())
    assert run_world.trap.connects == []


@pytest.mark.slow
async def test_explicit_allowances_still_reach_private_addresses(run_world: RunWorld) -> None:
    p = run_world.ports
    cases = {
        "localhost": f"http://localhost:{p['ok_localhost']}/",  # the local model server rule
        "literal": f"http://127.0.0.1:{p['ok_literal']}/",  # an IP literal host:port rule
        "cidr": f"http://127.0.0.9:{p['ok_cidr']}/",  # a CIDR rule
        "corp": f"http://internal.corp.test:{p['ok_corp']}/",  # private_addresses: allow
        "resolve": "http://resolved.example.test/",  # an upstream.resolve target
    }
    for name, url in cases.items():
        _, out, err = await run_world.curl("--noproxy", "", url)
        assert status_of(out)[0] == "200", (name, out, err)
        assert run_world.ok[name].connects, name
    _, out, err = await run_world.curl(f"http://127.0.0.1:{p['svc_ok']}/v1/x")  # service plane
    assert status_of(out)[0] == "200", err
    assert run_world.trap.connects == []


# -- in a namespace of its own (root): the system resolver, as a real user has it ----------

NS_CONFIG = """version: 1
egress:
  default: deny
  hosts:
    "*.allowed.test": {{}}
upstream:
{upstream}
audit:
  path: {audit}
"""
PUBLIC = "203.0.113.5"  # a documentation address on the namespace's own loopback device
NS_ZONE = {
    "rebind.allowed.test": {"A": [[PUBLIC], ["127.0.0.1"]]},
    "rebind2.allowed.test": {"A": [[PUBLIC], ["127.0.0.1"]]},  # a fresh count for a 2nd test
    "internal.allowed.test": {"A": [["127.0.0.1"]]},
    "mapped.allowed.test": {"AAAA": [["::ffff:127.0.0.1"]]},
}


@dataclass
class NsWorld:
    ns: NetNamespace
    dir: Path

    def connects(self) -> list[dict[str, str]]:
        return (
            [json.loads(x) for x in (self.dir / "connects.jsonl").read_text().splitlines() if x]
            if (self.dir / "connects.jsonl").exists()
            else []
        )

    def run(self, upstream: str, script: str) -> tuple[list[tuple[str, str]], str]:
        """`keyward run` inside the namespace; `script` runs curl lines, one result each."""
        for f in ("connects.jsonl", "audit.jsonl"):
            (self.dir / f).unlink(missing_ok=True)
        config = self.dir / "keyward.yaml"
        config.write_text(NS_CONFIG.format(upstream=upstream, audit=self.dir / "audit.jsonl"))
        env = gateway_env(self.dir / "state")
        argv = [*KEYWARD, "run", "-c", str(config), "--", "sh", "-c", script]
        proc = self.ns.run(argv, env=env, timeout=120, cwd=self.dir)
        lines = [ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith("=")]
        return [(a[1:], b) for a, b in lines], proc.stderr

    def audit(self) -> list[dict[str, object]]:
        return read_audit(self.dir / "audit.jsonl")


def curl_lines(*urls: str) -> str:
    fmt = "'\\n=%{http_code} %header{x-keyward-reason}\\n'"
    return "; ".join(f"curl -sS -o /dev/null --max-time 20 -w {fmt} {u}" for u in urls)


@pytest.fixture(scope="module")
def ns_world(root_ok: None) -> Iterator[NsWorld]:
    base = Path(tempfile.mkdtemp(prefix="keyward-addrtest-"))
    with NetNamespace() as ns:
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True)
        try:
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
            subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{PUBLIC}/32", "dev", "lo"],
                           check=True)  # fmt: skip
            zone = base / "zone.json"
            zone.write_text(json.dumps(NS_ZONE))
            ns.exec([sys.executable, str(ROOT / "tests/support/addr_servers.py"), "--dir",
                     str(base), "--dns", "127.0.0.1:53", "--zone", str(zone),
                     "--http", f"public={PUBLIC}:80", "--http", "private=127.0.0.1:80"])  # fmt: skip
            deadline = time.monotonic() + 20
            while not (base / "ready").exists():
                assert time.monotonic() < deadline, "test servers did not start"
                time.sleep(0.05)
            yield NsWorld(ns, base)
        finally:
            shutil.rmtree(etc, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.root
def test_rebinding_name_never_reaches_loopback_system_resolver(ns_world: NsWorld) -> None:
    """First answer a public-looking address, every later one 127.0.0.1: each dial connects
    to an address that was checked, never to a second, unchecked answer."""
    url = "http://rebind.allowed.test/"
    results, err = ns_world.run("  ca_bundle: null", curl_lines(url, url, url))
    assert results[0] == ("200", ""), err
    assert all(r == ("200", "") or r == ("403", REASON) for r in results), (results, err)
    labels = [c["label"] for c in ns_world.connects()]
    assert "private" not in labels and "public" in labels


@pytest.mark.root
def test_rebinding_name_is_refused_once_it_answers_private(ns_world: NsWorld) -> None:
    """With the answers' TTL 0 honoured (`upstream.nameservers`), the second dial resolves
    again, sees 127.0.0.1 and is refused before any connect."""
    url = "http://rebind2.allowed.test/"
    results, err = ns_world.run('  nameservers: ["127.0.0.1:53"]', curl_lines(url, url))
    assert results == [("200", ""), ("403", REASON)], err
    assert [c["label"] for c in ns_world.connects()] == ["public"]
    [rec] = refused(ns_world.audit(), "rebind2.allowed.test")
    assert rec["addr"] == "127.0.0.1"


@pytest.mark.root
def test_loopback_and_mapped_answers_from_the_system_resolver(ns_world: NsWorld) -> None:
    urls = ("http://internal.allowed.test/", "http://mapped.allowed.test/")
    results, err = ns_world.run("  ca_bundle: null", curl_lines(*urls))
    assert results == [("403", REASON), ("403", REASON)], err
    assert ns_world.connects() == []


# -- in the pod (root, transparent): the DNS listener and the data plane ---------------------

POD_CONFIG = """version: 1
egress:
  default: {default}
  hosts:
    "*.allowed.test": {{}}
audit:
  path: {audit}
"""
POD_ZONE = {
    "internal.allowed.test": {"A": [["127.0.0.1"]]},
    "imds.allowed.test": {"A": [["169.254.169.254"]]},
    "imds6.allowed.test": {"AAAA": [["fd00:ec2::254"]]},
    "rfc1918.allowed.test": {"A": [["10.1.2.3"]]},
}
TRAPPED = ("169.254.169.254", "10.1.2.3")


@dataclass
class PodWorld:
    topo: Topology
    pod: IsolatedPod
    dir: Path

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        fmt = "\n=%{http_code} %header{x-keyward-reason}\n"
        argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-w", fmt, *args]
        return self.pod.run_agent(argv, timeout=60)

    def connects(self) -> list[dict[str, str]]:
        path = self.dir / "pod-side" / "connects.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []

    def dropped(self) -> int:
        """Packets the pod sent towards the metadata or RFC 1918 address (dropped, counted)."""
        out = self.topo.pod.run(["iptables", "-t", "raw", "-L", "OUTPUT", "-v", "-x", "-n"],
                                check=True).stdout  # fmt: skip
        return sum(int(ln.split()[0]) for ln in out.splitlines() if any(a in ln for a in TRAPPED))

    def audit(self) -> list[dict[str, object]]:
        return read_audit(self.dir / "audit.jsonl")


@pytest.fixture(scope="module", params=["deny", "allow"])
def pod_world(request: pytest.FixtureRequest, root_ok: None) -> Iterator[PodWorld]:
    base = Path(tempfile.mkdtemp(prefix="keyward-addrpod-"))
    base.chmod(0o755)
    with Topology() as topo:
        dns = topo.addr.hosts4[0]
        for side in ("upstream-side", "pod-side"):
            (base / side).mkdir()
        zone = base / "zone.json"
        zone.write_text(json.dumps(POD_ZONE))
        servers = [sys.executable, str(ROOT / "tests/support/addr_servers.py")]
        topo.upstream.exec([*servers, "--dir", str(base / "upstream-side"), "--dns",
                            f"{dns}:53", "--zone", str(zone)])  # fmt: skip
        # The pod's own loopback service, which nothing from the agent may reach.
        topo.pod.exec([*servers, "--dir", str(base / "pod-side"), "--dns", "127.0.0.1:5399",
                       "--zone", str(zone), "--http", "private=127.0.0.1:18999"])  # fmt: skip
        deadline = time.monotonic() + 20
        while not all((base / s / "ready").exists() for s in ("upstream-side", "pod-side")):
            assert time.monotonic() < deadline, "test servers did not start"
            time.sleep(0.05)
        for addr in TRAPPED:  # count (and drop) anything headed there, from any uid
            topo.pod.run(["iptables", "-t", "raw", "-I", "OUTPUT", "-d", addr, "-j", "DROP"],
                         check=True)  # fmt: skip
        config = base / "keyward.yaml"
        config.write_text(POD_CONFIG.format(default=request.param, audit=base / "audit.jsonl"))
        # The gateway's system resolver in the pod asks the upstream namespace's DNS server.
        etc = Path("/etc/netns") / topo.pod.name
        etc.mkdir(parents=True)
        try:
            (etc / "resolv.conf").write_text(f"nameserver {dns}\noptions attempts:1\n")
            pod = IsolatedPod(topo.pod, config, base / "state", work=base / "pod")
            pod.start(env=dict(os.environ))
            try:
                yield PodWorld(topo, pod, base)
            finally:
                pod.stop_gateway()
        finally:
            shutil.rmtree(etc, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.root
def test_pod_dns_refuses_a_wildcard_name_answering_loopback(pod_world: PodWorld) -> None:
    r = pod_world.curl("http://internal.allowed.test:18999/")
    assert r.returncode != 0 and "=200" not in r.stdout, r.stdout
    assert pod_world.connects() == []
    recs = [r for r in refused(pod_world.audit(), "internal.allowed.test") if r["plane"] == "dns"]
    assert recs and recs[0]["addr"] == "127.0.0.1", json.dumps(pod_world.audit())


@pytest.mark.root
def test_pod_dns_refuses_metadata_and_rfc1918_answers(pod_world: PodWorld) -> None:
    for name in ("imds.allowed.test", "imds6.allowed.test", "rfc1918.allowed.test"):
        r = pod_world.curl(f"http://{name}/latest/meta-data/")
        assert r.returncode != 0 and "=200" not in r.stdout, (name, r.stdout)
        recs = [x for x in refused(pod_world.audit(), name) if x["plane"] == "dns"]
        assert recs, name
    assert pod_world.dropped() == 0  # refused before any connect: not one packet left


@pytest.mark.root
def test_pod_transparent_dial_to_loopback_is_refused(pod_world: PodWorld) -> None:
    """Past DNS: the agent connects to the pod's loopback itself, Host naming that address.
    Under `default: allow` that is an allowed destination, so only the dial check stops it."""
    r = pod_world.curl("http://127.0.0.1:18999/")
    assert "=403" in r.stdout, r.stdout + r.stderr
    assert pod_world.connects() == []
