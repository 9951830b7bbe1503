"""`keyward up` on the real engines (Podman and Docker): the pod of DESIGN §1 built through the
engine socket, attacked from the agent exactly like the namespace pod in test_pod.py.

Topology per engine: an `Internal: true` network holding a fake upstream container (the gateway
image's python + tests/support/upstream_main.py); the gateway joins that network only; the agent
joins the gateway's namespace. Names are mapped with `upstream.resolve`; nothing real is contacted.
Everything made here is labelled `keyward.test=1` and `keyward.pair=<name>` and removed at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway import pair
from gateway.config.loader import load_config
from gateway.credentials.sources import load_secrets
from gateway.engine.client import EngineClient, ExecResult
from gateway.engine.errors import EngineError, NotFound
from gateway.pair.agent_trust import add_ca_to_system_bundles

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
SOCKETS = {"podman": "/run/podman/podman.sock", "docker": "/run/docker.sock"}
REAL_KEY = "sk-test-ENGINESECRET-0123456789abcdefXYZ"
TEST_LABELS = {"keyward.test": "1"}
UP_DIR = "/tmp/up"
GO_MODE_SYMLINK = 1 << 27  # os.ModeSymlink in the engines' path stat
T = TypeVar("T")

CONFIG = """version: 1
secrets:
  key: {{ env: E2E_API_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
    other.example.test: {{}}
placeholders:
  E2E_API_KEY: {{ secret: key }}
upstream:
  ca_bundle: ./upstream-ca.pem
  resolve:
    "api.example.test:443": "{ip}:443"
    "other.example.test:443": "{ip}:443"
"""


def _engine_problem(kind: str, sock: str | None = None) -> str | None:
    """Why the `kind` engine (at its usual socket unless `sock`) cannot be used here, or None."""
    sock = sock or SOCKETS[kind]
    if not Path(sock).exists():
        return f"{kind}: no API socket at {sock}"

    async def probe() -> str | None:
        async with EngineClient(sock, timeout=10) as c:
            ping = await c.ping()
            if ping.kind != kind:
                return f"{sock} answers as {ping.kind}, not {kind}"
            for image in (pair.DEFAULT_GATEWAY_IMAGE, pair.DEFAULT_AGENT_IMAGE):
                try:
                    await c.image_inspect(image)
                except NotFound:
                    return f"{kind}: image {image} missing (scripts/build-images)"
        return None

    try:
        return asyncio.run(probe())
    except EngineError as e:
        return f"{kind}: {e}"


def require_engine(kind: str) -> None:
    """Skip (or, with CI=true, fail) unless the engine answers and the images are built."""
    skip_or_fail_in_ci(_engine_problem(kind))


def skip_or_fail_in_ci(problem: str | None) -> None:
    """Nothing if no problem; otherwise skip, or fail with CI=true (engine tests must run there)."""
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"engine test cannot run with CI=true: {problem}", pytrace=False)
    pytest.skip(problem)


def _support_tar() -> bytes:
    """tests/support/{upstream_main,upstream,pki}.py as `src/tests/support/...` (its imports)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in ("up", "up/src", "up/src/tests", "up/src/tests/support", "up/run"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        files = {"up/src/tests/__init__.py": b"", "up/src/tests/support/__init__.py": b""}
        for name in ("upstream_main.py", "upstream.py", "model_api.py", "pki.py"):
            files[f"up/src/tests/support/{name}"] = (ROOT / "tests/support" / name).read_bytes()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class EngineWorld:
    kind: str
    socket: str
    name: str
    network: str
    upstream: str
    upstream_ip: str
    base: Path
    info: pair.PairInfo | None = None
    up_seconds: float = 0.0
    created: list[str] = field(default_factory=list)

    def run(self, fn: Callable[[EngineClient], Awaitable[T]]) -> T:
        async def go() -> T:
            async with EngineClient(self.socket) as c:
                return await fn(c)

        return asyncio.run(go())

    @property
    def agent_id(self) -> str:
        assert self.info is not None
        return self.info.agent_id

    @property
    def gateway_id(self) -> str:
        assert self.info is not None
        return self.info.gateway_id

    def agent(self, *argv: str, stdin: bytes | None = None) -> ExecResult:
        return self.run(lambda c: c.exec_run(self.agent_id, list(argv), stdin=stdin))

    def curl(self, *args: str) -> ExecResult:
        return self.agent("curl", "-sS", "--max-time", "30", *args)  # a hang bound

    def seen(self) -> list[dict[str, Any]]:
        r = self.run(lambda c: c.exec_run(self.upstream, ["cat", f"{UP_DIR}/run/seen.jsonl"]))
        return [json.loads(x) for x in r.stdout.decode().splitlines() if x.strip()]

    def cli(self, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", argv[0], "--engine-socket", self.socket, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


async def _start_upstream(c: EngineClient, name: str, network: str) -> tuple[str, str, bytes]:
    body = {
        "Image": pair.DEFAULT_GATEWAY_IMAGE,
        "Entrypoint": ["python", f"{UP_DIR}/src/tests/support/upstream_main.py"],
        "Cmd": ["--dir", f"{UP_DIR}/run", "--host", "0.0.0.0",
                "--names", "api.example.test", "other.example.test"],
        "User": "0:0",
        "WorkingDir": "/tmp",
        "Labels": {**TEST_LABELS, pair.LABEL_PAIR: name, pair.LABEL_ROLE: "upstream"},
        "HostConfig": {
            "NetworkMode": network,
            "CapDrop": ["ALL"],
            "CapAdd": ["NET_BIND_SERVICE"],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": 128,
        },
        "NetworkingConfig": {"EndpointsConfig": {network: {}}},
    }  # fmt: skip
    cid = await c.container_create(f"keyward-{name}-upstream", body)
    await c.put_archive(cid, "/tmp", _support_tar())
    await c.container_start(cid)
    deadline = time.monotonic() + 30
    while (await c.exec_run(cid, ["test", "-e", f"{UP_DIR}/run/ready"])).exit_code != 0:
        state = (await c.container_inspect(cid))["State"]
        if not state.get("Running") or time.monotonic() > deadline:
            logs = await pair.gateway_logs(c, cid)
            raise AssertionError(f"fake upstream did not start: {logs}")
        await asyncio.sleep(0.1)
    ca = (await c.exec_run(cid, ["cat", f"{UP_DIR}/run/pki/test-ca.pem"])).stdout
    nets = (await c.container_inspect(cid))["NetworkSettings"]["Networks"]
    ip = next(iter(nets.values()))["IPAddress"]
    return cid, ip, ca


def _forward_rule(subnet: str, name: str) -> list[str]:
    return ["DOCKER-USER", "-s", subnet, "-d", subnet, "-m", "comment",
            "--comment", f"keyward-test {name}", "-j", "ACCEPT"]  # fmt: skip


def _allow_intra_network(kind: str, subnet: str, name: str) -> list[str] | None:
    """Docker on the same host sets FORWARD to DROP and loads br_netfilter, so frames between two
    members of a Podman internal bridge are dropped (netavark adds no FORWARD rule for internal
    networks). Allow only traffic inside the test network's own subnet, in Docker's user chain,
    for the duration of the test; returns the rule to delete afterwards."""
    if kind != "podman" or shutil.which("iptables") is None:
        return None
    have = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, check=False)
    if have.returncode != 0:
        return None
    rule = _forward_rule(subnet, name)
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
    return rule


async def _cleanup(c: EngineClient, name: str) -> None:
    await pair.down(c, name)
    label = {"label": [f"{pair.LABEL_PAIR}={name}"]}
    for ct in await c.container_list(label):
        await c.container_remove(ct["Id"], force=True)
    for n in await c.network_list(label):
        await c.network_remove(n["Id"])


async def _leftovers(c: EngineClient, name: str) -> list[str]:
    label = {"label": [f"{pair.LABEL_PAIR}={name}"]}
    out = [f"container {x['Id'][:12]}" for x in await c.container_list(label)]
    out += [f"volume {x['Name']}" for x in await c.volume_list(label)]
    out += [f"network {x['Name']}" for x in await c.network_list(label)]
    return out


@pytest.fixture(scope="module", params=["podman", "docker"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineWorld]:  # fmt: skip
    kind = request.param
    require_engine(kind)
    sock = SOCKETS[kind]
    name = f"e2e-{kind}-{secrets.token_hex(3)}"
    labels = {**TEST_LABELS, pair.LABEL_PAIR: name}

    async def run(fn: Callable[[EngineClient], Awaitable[T]]) -> T:
        async with EngineClient(sock) as c:
            return await fn(c)

    base = tmp_path_factory.mktemp(f"e2e-{kind}")
    rule: list[str] | None = None
    try:
        net = f"keyward-{name}-net"
        asyncio.run(run(lambda c: c.network_create(net, internal=True, labels=labels)))
        ipam = asyncio.run(run(lambda c: c.network_inspect(net)))["IPAM"]["Config"]
        rule = _allow_intra_network(kind, ipam[0]["Subnet"], name)
        upstream, ip, ca = asyncio.run(run(lambda c: _start_upstream(c, name, net)))
        (base / "upstream-ca.pem").write_bytes(ca)
        (base / "keyward.yaml").write_text(CONFIG.format(ip=ip))
        w = EngineWorld(kind, sock, name, net, upstream, ip, base)
        loaded = load_config(base / "keyward.yaml")
        store = load_secrets(
            loaded.config.secrets, config_dir=base, environ={"E2E_API_KEY": REAL_KEY}
        )
        opts = pair.PairOptions(name=name, networks=[net], labels=TEST_LABELS)
        t0 = time.monotonic()
        w.info = asyncio.run(run(lambda c: pair.up(c, loaded, store, opts)))
        w.up_seconds = time.monotonic() - t0
        print(
            f"\n{kind}: keyward up -> ready {w.info.ready_seconds:.2f} s "
            f"(up incl. agent start {w.up_seconds:.2f} s)"
        )
        yield w
    finally:
        asyncio.run(run(lambda c: _cleanup(c, name)))
        if rule is not None:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


def test_up_returns_a_running_pair(world: EngineWorld) -> None:
    """`up` returns once the pair is ready (how long it took is printed, not asserted)."""
    assert world.info is not None and world.info.ready_seconds > 0
    for cid in (world.gateway_id, world.agent_id):
        state = world.run(lambda c, cid=cid: c.container_inspect(cid))["State"]
        assert state["Running"], state


def test_agent_env_has_trust_and_placeholder_but_no_secret(world: EngineWorld) -> None:
    r = world.agent("env")
    out = r.stdout.decode()
    assert REAL_KEY not in out
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["E2E_API_KEY"].startswith("sk-") and env["E2E_API_KEY"] != REAL_KEY
    assert env["SSL_CERT_FILE"] == "/etc/keyward/ca-bundle.crt"
    assert world.agent("id", "-u").stdout.decode().strip() == "1000"
    status = world.agent("cat", "/proc/self/status").stdout.decode()
    caps = {k: v.strip() for k, _, v in (x.partition(":") for x in status.splitlines())}
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapBnd"], 16) == 0
    assert caps["NoNewPrivs"] == "1"


def test_gateway_container_config_on_engine(world: EngineWorld) -> None:
    gw = world.run(lambda c: c.container_inspect(world.gateway_id))
    host = gw["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["PidsLimit"] > 0 and host["Memory"] > 0
    assert set(host["CapAdd"] or []) <= {f"CAP_{c}" for c in pair.GATEWAY_CAPS} | set(
        pair.GATEWAY_CAPS
    )
    # the serving process itself: proxy uid, nothing effective, empty bounding set, no-new-privs
    r = world.run(lambda c: c.exec_run(world.gateway_id, ["cat", "/proc/1/status"]))
    status = dict(
        (k, v.strip()) for k, _, v in (x.partition(":") for x in r.stdout.decode().splitlines())
    )
    assert status["Uid"].split()[0] == "10101"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    agent = world.run(lambda c: c.container_inspect(world.agent_id))
    assert agent["HostConfig"]["NetworkMode"].startswith("container:")
    assert REAL_KEY not in json.dumps([gw, agent])


def test_curl_gets_the_key_injected(world: EngineWorld) -> None:
    r = world.curl("https://api.example.test/v1/curl")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["headers"]["Authorization"] == "Bearer [REDACTED]"
    assert REAL_KEY.encode() not in r.stdout
    hit = [s for s in world.seen() if s.get("path") == "/v1/curl"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"


def test_python_gets_the_key_injected(world: EngineWorld) -> None:
    script = (
        "import json, urllib.request\n"
        "r = urllib.request.urlopen('https://api.example.test/v1/py', timeout=10)\n"
        "print(json.load(r)['headers']['Authorization'])\n"
    )
    r = world.agent("python3", "-c", script)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().strip() == "Bearer [REDACTED]"
    hit = [s for s in world.seen() if s.get("path") == "/v1/py"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"


def test_clients_reading_no_ca_variable_trust_the_gateway(world: EngineWorld) -> None:
    """curl, Python and git with a clean environment (no SSL_CERT_FILE and the like) read only
    the image's system bundle: up appended the gateway CA to it, keeping the image's roots."""
    clean = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp"]
    r = world.agent(*clean, "curl", "-sS", "--max-time", "30", "https://api.example.test/sys/curl")
    assert r.exit_code == 0, r.stderr
    script = "import urllib.request as u; u.urlopen('https://api.example.test/sys/py', timeout=10)"
    r = world.agent(*clean, "python3", "-c", script)
    assert r.exit_code == 0, r.stderr
    r = world.agent(*clean, "git", "ls-remote", "https://api.example.test/sys/git.git")
    assert b"certificate" not in r.stderr.lower() and b"ssl" not in r.stderr.lower(), r.stderr
    paths = {str(s.get("path")).partition("?")[0] for s in world.seen()}
    assert {"/sys/curl", "/sys/py", "/sys/git.git/info/refs"} <= paths
    bundle = world.agent("cat", "/etc/ssl/certs/ca-certificates.crt").stdout
    ca = world.run(lambda c: c.exec_run(world.gateway_id, ["cat", "/var/lib/keyward/trust/ca.crt"]))
    assert bundle.count(ca.stdout.strip()) == 1
    assert bundle.count(b"BEGIN CERTIFICATE") > 100  # the image's own roots are still there


@pytest.mark.parametrize("kind", ["podman", "docker"])
def test_system_bundle_links_are_followed_and_the_ca_added_once(kind: str) -> None:
    """Bundle paths that are links (RHEL's ca-bundle.crt, Alpine's cert.pem) lead to the one
    file, which gets the CA once, however often it is asked (a pair brought up again)."""
    require_engine(kind)
    ca = b"-----BEGIN CERTIFICATE-----\nTESTCA\n-----END CERTIFICATE-----\n"
    links = {"etc/pki/tls/certs/ca-bundle.crt": "../../../ssl/certs/ca-certificates.crt",
             "etc/ssl/cert.pem": "/etc/ssl/certs/ca-certificates.crt"}  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in ("etc/pki", "etc/pki/tls", "etc/pki/tls/certs"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    body = {"Image": pair.DEFAULT_AGENT_IMAGE, "Cmd": ["true"], "Labels": TEST_LABELS,
            "HostConfig": {"NetworkMode": "none"}}  # fmt: skip

    async def go() -> tuple[list[str], list[str], bytes, list[int]]:
        async with EngineClient(SOCKETS[kind]) as c:
            cid = await c.container_create(f"keyward-test-links-{secrets.token_hex(3)}", body)
            try:
                await c.put_archive(cid, "/", buf.getvalue())
                first = await add_ca_to_system_bundles(c, cid, ca)
                again = await add_ca_to_system_bundles(c, cid, ca)
                raw = await c.get_archive(cid, "/etc/ssl/certs/ca-certificates.crt")
                modes = [(await c.path_stat(cid, "/" + name))["mode"] for name in links]
            finally:
                await c.container_remove(cid, force=True)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            member = tf.extractfile(tf.next())  # type: ignore[arg-type]
            assert member is not None
            return first, again, member.read(), modes

    first, again, bundle, modes = asyncio.run(go())
    assert all(mode & GO_MODE_SYMLINK for mode in modes)  # the links are still links
    assert first == again == ["/etc/ssl/certs/ca-certificates.crt"]
    assert bundle.count(ca) == 1 and bundle.endswith(ca)
    assert bundle.count(b"BEGIN CERTIFICATE") > 100


def test_allowed_host_without_injection_gets_nothing(world: EngineWorld) -> None:
    r = world.curl("https://other.example.test/plain")
    assert r.exit_code == 0, r.stderr
    hit = [s for s in world.seen() if s.get("path") == "/plain"]
    assert hit and "Authorization" not in hit[-1]["headers"]


def test_denied_host_gets_403(world: EngineWorld) -> None:
    r = world.curl("-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                   f"evil.example.test:443:{world.upstream_ip}", "https://evil.example.test/")  # fmt: skip
    assert r.stdout.decode() == "403"
    assert not [s for s in world.seen() if "evil" in str(s.get("host"))]


def test_direct_egress_fails(world: EngineWorld) -> None:
    before = len(world.seen())
    script = (
        "import socket, sys\n"
        "for port in (9999, 22):\n"
        "    try:\n"
        f"        s = socket.create_connection(('{world.upstream_ip}', port), timeout=3)\n"
        "        s.sendall(b'x\\r\\n'); print(port, 'GOT', s.recv(64))\n"
        "    except OSError as e:\n"
        "        print(port, 'blocked', e)\n"
    )
    r = world.agent("python3", "-c", script)
    assert "GOT b'UPSTREAM" not in r.stdout.decode(), r.stdout
    assert [s for s in world.seen()[before:] if "tcp" in s or "udp" in s] == []


def test_dns_only_allowed_names(world: EngineWorld) -> None:
    script = (
        "import socket, sys\n"
        "for n in sys.argv[1:]:\n"
        "    try: print(n, sorted({a[4][0] for a in socket.getaddrinfo(n, 443, socket.AF_INET)}))\n"
        "    except socket.gaierror as e: print(n, 'ERR', e.errno)\n"
    )
    r = world.agent("python3", "-c", script, "api.example.test", "evil.example.test",
                    "x" * 50 + ".exfil.example.test")  # fmt: skip
    lines = r.stdout.decode().splitlines()
    assert lines[0] == f"api.example.test ['{world.upstream_ip}']"
    assert "ERR" in lines[1] and "ERR" in lines[2]


def test_cli_status_exec_logs(world: EngineWorld) -> None:
    st = world.cli("status", "--name", world.name)
    assert st.returncode == 0, st.stderr
    assert "ready" in st.stdout and "allow" in st.stdout
    st = world.cli("status", "--name", world.name, "--json")
    report = json.loads(st.stdout)
    assert report["members"][0]["role"] == "gateway" and report["members"][0]["health"] == "ready"
    assert report["audit"]["allow"] >= 1
    ex = world.cli("exec", "--name", world.name, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert ex.returncode == 3 and ex.stdout == "out\n" and "err" in ex.stderr
    logs = world.cli("logs", "--name", world.name, "gateway")
    assert logs.returncode == 0 and "ready" in logs.stdout + logs.stderr


def test_status_reports_a_credential_its_upstream_keeps_refusing(world: EngineWorld) -> None:
    for _ in range(3):
        world.curl("https://api.example.test/status/401")
    st = world.cli("status", "--name", world.name, "--json")
    assert st.returncode == 3, st.stdout + st.stderr
    report = json.loads(st.stdout)
    assert report["credentials"]["key"]["failing"] is True
    assert any("credential 'key' is failing" in p for p in report["problems"])
    assert REAL_KEY not in st.stdout
    world.curl("https://api.example.test/v1/ok")  # the key works again
    st = world.cli("status", "--name", world.name, "--json")
    assert st.returncode == 0, st.stdout
    assert json.loads(st.stdout)["credentials"]["key"]["failing"] is False


def test_audit_verify_passes(world: EngineWorld) -> None:
    cfg = str(world.base / "keyward.yaml")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", world.name, "-c", cfg,
         "--engine-socket", world.socket, "--json"],
        capture_output=True, text=True, timeout=280, check=False,
        env={**os.environ, "E2E_API_KEY": REAL_KEY},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["failed"] == 0 and report["results"], report
    assert REAL_KEY not in r.stdout + r.stderr


def test_cli_up_with_workspace_and_command(world: EngineWorld, tmp_path: Path) -> None:
    """The CLI path: `keyward up ... --workspace DIR -- CMD`, then exec and down by name."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hello.txt").write_text("from the host\n")
    name = f"{world.name}-cli"
    env = {**os.environ, "E2E_API_KEY": REAL_KEY}
    cmd = [sys.executable, "-m", "gateway"]
    sock = ["--engine-socket", world.socket]
    try:
        up = subprocess.run(
            [*cmd, "up", *sock, "-c", str(world.base / "keyward.yaml"), "--name", name,
             "--network", world.network, "--workspace", str(ws), "--agent-read-only",
             "--", "sh", "-c", "while :; do sleep 1; done"],
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert "ready in" in up.stderr
        ex = subprocess.run(
            [*cmd, "exec", *sock, "--name", name, "--", "sh", "-c",
             "cat /workspace/hello.txt; curl -sS -m 10 https://api.example.test/v1/cli; "
             "if touch /usr/x 2>/dev/null; then echo WRITABLE; fi"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ex.returncode == 0, ex.stderr
        assert "from the host" in ex.stdout and "Bearer [REDACTED]" in ex.stdout
        assert "WRITABLE" not in ex.stdout
        assert REAL_KEY not in ex.stdout
        # down --keep-state keeps only the state volume; the next up has the same CA
        ca = [*cmd, "exec", *sock, "--name", name, "--", "cat", "/etc/keyward/ca.crt"]
        before = subprocess.run(ca, capture_output=True, text=True, timeout=60).stdout
        kept = subprocess.run([*cmd, "down", *sock, "--name", name, "--keep-state"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert kept.returncode == 0, kept.stderr
        assert world.run(lambda c: _leftovers(c, name)) == [f"volume keyward-{name}-state"]
        again = subprocess.run(up.args, capture_output=True, text=True, timeout=120, env=env)
        assert again.returncode == 0, again.stderr
        after = subprocess.run(ca, capture_output=True, text=True, timeout=60).stdout
        assert "BEGIN CERTIFICATE" in before and after == before
    finally:
        down = subprocess.run(
            [*cmd, "down", *sock, "--name", name], capture_output=True, text=True, timeout=60
        )
    assert down.returncode == 0, down.stderr
    assert world.run(lambda c: _leftovers(c, name)) == []


def test_y_gateway_restart_keeps_ca_and_agent_works(world: EngineWorld) -> None:
    def fingerprint() -> str:
        pem = world.agent("cat", "/etc/keyward/ca.crt").stdout
        assert b"BEGIN CERTIFICATE" in pem
        return hashlib.sha256(pem).hexdigest()

    before = fingerprint()

    async def restart(c: EngineClient) -> float:
        await c.container_stop(world.gateway_id, timeout=10)
        await c.container_start(world.gateway_id)
        took = await pair.wait_ready(c, world.gateway_id, 60)
        state = (await c.container_inspect(world.agent_id))["State"]
        if not state.get("Running"):
            print(f"\n{world.kind}: agent stopped with the gateway; starting it again")
            await c.container_start(world.agent_id)  # the joiner went down with its netns owner
        return took

    took = world.run(restart)
    r = world.curl("https://api.example.test/v1/after-restart")
    if r.exit_code != 0:  # the agent lost its namespace: restart it after its owner
        print(f"\n{world.kind}: agent lost the gateway's namespace; restarting it")
        world.run(lambda c: c.container_stop(world.agent_id, timeout=2))
        world.run(lambda c: c.container_start(world.agent_id))
        r = world.curl("https://api.example.test/v1/after-restart")
    assert r.exit_code == 0, r.stderr
    print(f"\n{world.kind}: gateway restart -> ready {took:.2f} s, same CA")
    assert fingerprint() == before
    hit = [s for s in world.seen() if s.get("path") == "/v1/after-restart"]
    assert hit and hit[-1]["headers"]["Authorization"] == f"Bearer {REAL_KEY}"


def test_z_down_leaves_nothing_labelled(world: EngineWorld) -> None:
    r = world.cli("down", "--name", world.name)
    assert r.returncode == 0, r.stderr
    assert "network" in r.stdout  # the test network carries the pair label too
    assert world.run(lambda c: _leftovers(c, world.name)) == []
