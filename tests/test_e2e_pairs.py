"""Pairs on the real engines (Podman and Docker) as users meet them: a name held by something
else, two `up`s racing, restarts, a gateway that is down, `exec -i`, workspace ownership and
the host gateway.

Each engine gets one `Internal: true` network with a fake upstream (as in test_e2e_engines.py);
every test makes its own pair with a unique name and removes it by label. Everything made here
carries `keyward.test=1` and `keyward.pair=<name>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway import pair
from gateway.config.loader import load_config
from gateway.credentials.sources import load_secrets
from gateway.engine.client import EngineClient
from gateway.engine.errors import NotFound
from gateway.pair.hostnet import forward_drop_problems
from tests.test_e2e_engines import (
    CONFIG,
    REAL_KEY,
    SOCKETS,
    TEST_LABELS,
    _allow_intra_network,
    _cleanup,
    _leftovers,
    _start_upstream,
    require_engine,
)

pytestmark = pytest.mark.engine
T = TypeVar("T")
SLEEPER = ["sh", "-c", "while :; do sleep 1; done"]


@dataclass
class World:
    kind: str
    socket: str
    prefix: str
    network: str
    upstream_ip: str
    base: Path
    names: list[str]

    def run(self, fn: Callable[[EngineClient], Awaitable[T]]) -> T:
        async def go() -> T:
            async with EngineClient(self.socket) as c:
                return await fn(c)

        return asyncio.run(go())

    def new_name(self, what: str) -> str:
        name = f"{self.prefix}-{what}"
        self.names.append(name)
        return name

    def opts(self, name: str, **kw: Any) -> pair.PairOptions:
        labels = {**TEST_LABELS, **kw.pop("labels", {})}
        return pair.PairOptions(name=name, networks=[self.network], labels=labels, **kw)

    def loaded(self) -> tuple[Any, Any]:
        loaded = load_config(self.base / "keyward.yaml")
        store = load_secrets(
            loaded.config.secrets, config_dir=self.base, environ={"E2E_API_KEY": REAL_KEY}
        )
        return loaded, store

    async def up(self, c: EngineClient, name: str, **kw: Any) -> pair.PairInfo:
        loaded, store = self.loaded()
        return await pair.up(c, loaded, store, self.opts(name, **kw))

    def cli(
        self, *argv: str, timeout: float = 180, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", argv[0], "--engine-socket", self.socket, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "E2E_API_KEY": REAL_KEY, **(env or {})},
            **kw,
        )

    def cli_up(self, name: str, *extra: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "up", "-c", str(self.base / "keyward.yaml"), "--name", name,
            "--network", self.network, *extra, **kw,
        )  # fmt: skip


@pytest.fixture(scope="module", params=["podman", "docker"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:  # fmt: skip
    kind = request.param
    require_engine(kind)
    sock = SOCKETS[kind]
    prefix = f"p{kind[0]}-{secrets.token_hex(3)}"
    base = tmp_path_factory.mktemp(f"pairs-{kind}")
    w = World(kind, sock, prefix, f"keyward-{prefix}-net", "", base, [prefix])
    labels = {**TEST_LABELS, pair.LABEL_PAIR: prefix}
    rule: list[str] | None = None
    try:
        w.run(lambda c: c.network_create(w.network, internal=True, labels=labels))
        subnet = w.run(lambda c: c.network_inspect(w.network))["IPAM"]["Config"][0]["Subnet"]
        rule = _allow_intra_network(kind, subnet, prefix)
        _, ip, ca = w.run(lambda c: _start_upstream(c, prefix, w.network))
        w.upstream_ip = ip
        (base / "upstream-ca.pem").write_bytes(ca)
        (base / "keyward.yaml").write_text(CONFIG.format(ip=ip))
        yield w
    finally:
        for name in reversed(w.names):
            with contextlib.suppress(Exception):
                w.run(lambda c, n=name: _cleanup(c, n))  # type: ignore[misc]
        if rule is not None:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


async def _foreign(c: EngineClient, name: str, image: str) -> str:
    """A user's own container, not labelled as any pair, holding `name`."""
    cid = await c.container_create(
        name,
        {"Image": image, "Entrypoint": SLEEPER, "Cmd": [], "Labels": dict(TEST_LABELS),
         "HostConfig": {"NetworkMode": "none"}},
    )  # fmt: skip
    await c.container_start(cid)
    return cid


def _running(w: World, cid: str) -> bool:
    try:
        return bool(w.run(lambda c: c.container_inspect(cid))["State"]["Running"])
    except NotFound:
        return False


# -- 1. ownership ------------------------------------------------------------------------------


def test_foreign_container_name_is_an_error_that_removes_nothing(world: World) -> None:
    name = world.new_name("foreign")
    names = pair.PairNames(name)
    for held in (names.gateway, names.agent):
        foreign = world.run(lambda c, h=held: _foreign(c, h, pair.DEFAULT_AGENT_IMAGE))  # type: ignore[misc]
        try:
            r = world.cli_up(name)
            assert r.returncode == 1, r.stderr
            assert f"not labelled keyward.pair={name}" in r.stderr
            assert "Traceback" not in r.stderr
            assert _running(world, foreign), "keyward removed a container it did not create"
            assert world.run(lambda c: _leftovers(c, name)) == []
            down = world.cli("down", "--name", name)
            assert down.returncode == 0, down.stderr
            assert _running(world, foreign), "down removed a container by name"
        finally:
            world.run(lambda c, f=foreign: c.container_remove(f, force=True))  # type: ignore[misc]


def test_foreign_volume_name_is_an_error_that_removes_nothing(world: World) -> None:
    name = world.new_name("fvol")
    vol = pair.PairNames(name).state_volume
    world.run(lambda c: c.volume_create(vol, labels=dict(TEST_LABELS)))
    try:
        r = world.cli_up(name)
        assert r.returncode == 1, r.stderr
        assert f"volume {vol} exists and is not labelled" in r.stderr
        assert world.run(lambda c: c.volume_inspect(vol))["Name"] == vol
        assert world.run(lambda c: _leftovers(c, name)) == []
    finally:
        world.run(lambda c: c.volume_remove(vol))


def test_concurrent_ups_one_wins_the_other_changes_nothing(world: World) -> None:
    name = world.new_name("race")

    async def race(c: EngineClient) -> list[Any]:
        async with EngineClient(world.socket) as c2:
            return await asyncio.gather(
                world.up(c, name), world.up(c2, name), return_exceptions=True
            )

    results = world.run(race)
    won = [r for r in results if isinstance(r, pair.PairInfo)]
    lost = [r for r in results if not isinstance(r, pair.PairInfo)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], pair.NameHeld), repr(lost[0])
    info = won[0]
    assert _running(world, info.gateway_id) and _running(world, info.agent_id)
    r = world.cli("exec", "--name", name, "--", "curl", "-sS", "-m", "10",
                  "https://api.example.test/v1/race")  # fmt: skip
    assert r.returncode == 0 and "Bearer [REDACTED]" in r.stdout, r.stderr
    # a third `up` is refused the same way and also changes nothing
    again = world.cli_up(name)
    assert again.returncode == 1 and "exists already" in again.stderr
    assert _running(world, info.gateway_id) and _running(world, info.agent_id)
    down = world.cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert world.run(lambda c: _leftovers(c, name)) == []


# -- 2. plain errors ---------------------------------------------------------------------------


def test_forward_drop_on_a_podman_internal_network_is_explained(world: World) -> None:
    if world.kind != "podman":
        pytest.skip("the FORWARD DROP trap is Docker's policy breaking Podman internal networks")
    name = world.new_name("fwd")
    net = f"keyward-{name}-net"
    labels = {**TEST_LABELS, pair.LABEL_PAIR: name}
    world.run(lambda c: c.network_create(net, internal=True, labels=labels))
    nets = world.run(lambda c: pair.internal_podman_networks(c, [net, world.network]))
    problems = forward_drop_problems(nets)
    policy = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
    if "-P FORWARD DROP" not in policy.stdout:
        pytest.skip("Docker's FORWARD DROP policy is not set on this host")
    assert len(problems) == 1, problems  # the fixture's network has the DOCKER-USER accept
    assert net in problems[0] and "iptables -I DOCKER-USER" in problems[0]


# -- 3./4. a pod that outlives its members; restart; status that tells the truth ----------------

MARKED = ["sh", "-c", "date +%s%N >> /tmp/started; while :; do sleep 1; done"]


@pytest.fixture(scope="module")
def healing(world: World) -> Iterator[tuple[World, str, pair.PairInfo]]:
    """One pair per engine whose agent command notes each start in /tmp/started."""
    name = world.new_name("heal")
    info = world.run(lambda c: world.up(c, name, command=MARKED))
    print(f"\n{world.kind}: up {name}: gateway ready {info.ready_seconds:.2f} s")
    yield world, name, info


def _status(w: World, name: str) -> tuple[int, dict[str, Any]]:
    """Exit code and the `status --json` report, with `members` keyed by role."""
    r = w.cli("status", "--name", name, "--json")
    assert r.returncode in (0, 3), r.stderr
    report = json.loads(r.stdout)
    report["members"] = {m["role"]: m for m in report["members"]}
    return r.returncode, report


def _curl(w: World, name: str, path: str) -> subprocess.CompletedProcess[str]:
    return w.cli("exec", "--name", name, "--", "curl", "-sS", "-m", "10",
                 f"https://api.example.test{path}")  # fmt: skip


def _agent_raw(w: World, info: pair.PairInfo, *argv: str) -> Any:
    """Exec in the agent directly through the engine (no keyward guard)."""
    return w.run(lambda c: c.exec_run(info.agent_id, list(argv)))


def _starts(w: World, info: pair.PairInfo) -> int:
    return len(_agent_raw(w, info, "cat", "/tmp/started").stdout.splitlines())


def _started_at(w: World, cid: str) -> str:
    return str(w.run(lambda c: c.container_inspect(cid))["State"]["StartedAt"])


def test_healthy_pair_status_exit_0(healing: tuple[World, str, pair.PairInfo]) -> None:
    w, name, info = healing
    rc, st = _status(w, name)
    assert rc == 0 and st["healthy"] and st["problems"] == [], st
    assert st["members"]["holder"]["netns"] == st["members"]["agent"]["netns"]
    text = w.cli("status", "--name", name)
    assert text.returncode == 0 and "healthy" in text.stdout
    r = _curl(w, name, "/v1/healthy")
    assert r.returncode == 0 and "Bearer [REDACTED]" in r.stdout, r.stderr
    assert _starts(w, info) == 1


def test_gateway_down_fails_closed_then_restart_gateway(
    healing: tuple[World, str, pair.PairInfo],
) -> None:
    """The gateway stops: the agent keeps its namespace and rules, so its connections are
    refused (never sent direct); `keyward restart gateway` brings it back without the agent."""
    w, name, info = healing
    agent_started = _started_at(w, info.agent_id)
    w.run(lambda c: c.container_stop(info.gateway_id, timeout=5))
    rc, st = _status(w, name)
    assert rc == 3 and any("gateway is" in p for p in st["problems"]), st
    text = w.cli("status", "--name", name)
    assert text.returncode == 3 and "degraded: gateway is" in text.stdout
    # fail closed: through the proxy path and straight at the upstream's address
    r = _agent_raw(w, info, "curl", "-sS", "-m", "10", "https://api.example.test/v1/closed")
    assert r.exit_code != 0
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('{w.upstream_ip}', 443), timeout=5); print('OPEN')\n"
        "except OSError as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    out = _agent_raw(w, info, "python3", "-c", probe).stdout.decode()
    assert out.startswith("refused ConnectionRefusedError"), out
    # keyward exec refuses to run anything while the gateway is not ready
    ex = w.cli("exec", "--name", name, "--", "echo", "ran")
    assert ex.returncode == 124 and "ran" not in ex.stdout
    t0 = time.monotonic()
    r = w.cli("restart", "--name", name, "gateway")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    print(f"\n{w.kind}: keyward restart gateway: {took:.2f} s (CLI, incl. start-up)")
    assert _curl(w, name, "/v1/after-gw").returncode == 0
    assert _started_at(w, info.agent_id) == agent_started  # the agent was never stranded
    assert _status(w, name)[0] == 0


def test_new_namespace_agent_waits_for_the_gateway_then_restart_recovers(
    healing: tuple[World, str, pair.PairInfo],
) -> None:
    """The holder dies and comes back (what an engine restart does): a new namespace with no
    rules. Members are stranded, `status` says so; an agent restarted by the engine first does
    not run its command; `keyward restart` recovers in the guarded order."""
    w, name, info = healing
    before = _starts(w, info)
    holder = info.holder_id
    w.run(lambda c: c.container_kill(holder))
    w.run(lambda c: c.container_start(holder))
    rc, st = _status(w, name)
    assert rc == 3, st
    assert "agent is not in the pair's network namespace" in st["problems"], st
    # the engine starts the agent before the gateway: it joins the bare namespace and waits
    w.run(lambda c: c.container_stop(info.agent_id, timeout=2))
    w.run(lambda c: c.container_start(info.agent_id))
    rc, st = _status(w, name)
    assert rc == 3 and st["members"]["agent"]["netns"] == st["members"]["holder"]["netns"]
    assert _starts(w, info) == before, "the agent's command ran before the gateway's rules"
    r = w.cli("restart", "--name", name, "agent")
    assert r.returncode == 1 and "not ready" in r.stderr
    t0 = time.monotonic()
    r = w.cli("restart", "--name", name)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    print(f"\n{w.kind}: recovery (keyward restart after the pod was recreated): {took:.2f} s")
    rc, st = _status(w, name)
    assert rc == 0, st
    assert _curl(w, name, "/v1/recovered").returncode == 0
    # it ran again only now: once the gateway's stamp named the new namespace (the waiting
    # command went ahead), and once more when `restart` restarted the agent itself
    assert _starts(w, info) > before


def test_stopped_agent_error_is_one_sentence(healing: tuple[World, str, pair.PairInfo]) -> None:
    w, name, info = healing
    w.run(lambda c: c.container_stop(info.agent_id, timeout=2))
    try:
        r = w.cli("exec", "--name", name, "--", "true")
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and f"keyward restart --name {name}" in r.stderr, r.stderr
        rc, st = _status(w, name)
        assert rc == 3 and any(p.startswith("agent is") for p in st["problems"])
    finally:
        assert w.cli("restart", "--name", name, "agent").returncode == 0
    assert _status(w, name)[0] == 0


# -- 5. exec -i -t -----------------------------------------------------------------------------


def test_exec_stdin_pipes_into_the_agent(healing: tuple[World, str, pair.PairInfo]) -> None:
    w, name, _ = healing
    r = w.cli("exec", "-i", "--name", name, "--", "sh", input="echo hi\n")
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    big = "x" * 3_000_000
    r = w.cli("exec", "-i", "--name", name, "--", "wc", "-c", input=big)
    assert r.returncode == 0 and r.stdout.strip() == str(len(big)), r.stderr
    r = w.cli("exec", "-i", "--name", name, "--", "sh", "-c", "read x; exit $x", input="7\n")
    assert r.returncode == 7
    # without -i the command gets no stdin at all (EOF), like docker exec
    r = w.cli("exec", "--name", name, "--", "sh", "-c", "cat; echo done", input="ignored\n")
    assert r.returncode == 0 and r.stdout == "done\n"


def _pty_exec(w: World, name: str, script: str, steps: list[tuple[str, bytes, tuple[int, int] | None]], nudge_until: bytes = b"") -> bytes:  # fmt: skip
    """Run `keyward exec -i -t -- sh -c SCRIPT` on a pseudo-terminal of 24x80; for each step,
    wait until the output so far contains the marker, then resize (rows, cols) and/or type.
    After the steps, press Enter each second until `nudge_until` shows (a resize travels to
    the engine on its own, after the signal)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    def winsize(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    argv = [sys.executable, "-m", "gateway", "exec", "--engine-socket", w.socket,
            "--name", name, "-i", "-t", "--", "sh", "-c", script]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # child: stdin/stdout/stderr are the pty's slave side
        os.execv(sys.executable, argv)
    winsize(fd, 24, 80)
    out = b""
    pending = list(steps)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0].encode() in out:
                _, typed, size = pending.pop(0)
                if size:
                    winsize(fd, *size)
                    os.kill(pid, signal.SIGWINCH)
                if typed:
                    os.write(fd, typed)
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready and not pending and nudge_until and nudge_until not in out:
                os.write(fd, b"\r")
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5, out
    return out


def test_exec_tty_size_resize_and_exit_code(healing: tuple[World, str, pair.PairInfo]) -> None:
    w, name, _ = healing
    script = (
        "tty; echo one; read a; stty size; echo two; "
        'while read b; do s=$(stty size); echo "size $s"; [ "$s" = \'33 101\' ] && exit 5; done'
    )
    steps = [("one", b"\r", None), ("two", b"", (33, 101))]
    out = _pty_exec(w, name, script, steps, nudge_until=b"size 33 101")
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert "24 80" in text and "33 101" in text, text


# -- 6. the agent's user: workspace files stay the user's --------------------------------------


def test_workspace_files_stay_owned_by_the_invoking_user(world: World, tmp_path: Path) -> None:
    """`up` run by a non-root user (here: root under sudo for uid 4321) runs the agent as that
    user, so what the agent writes in the workspace belongs to the user, and it can write at all."""
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chown(ws, 4321, 4321)
    name = world.new_name("ws")
    sudo = {"SUDO_UID": "4321", "SUDO_GID": "4321", "SUDO_USER": "someone"}
    r = world.cli_up(name, "--workspace", str(ws), env=sudo)
    assert r.returncode == 0, r.stderr
    ex = world.cli("exec", "--name", name, "--", "sh", "-c",
                   "id -u; id -g; echo from-agent > /workspace/made.txt")  # fmt: skip
    assert ex.returncode == 0, ex.stderr
    assert ex.stdout.split() == ["4321", "4321"]
    made = ws / "made.txt"
    assert made.read_text() == "from-agent\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (4321, 4321)
    assert world.cli("down", "--name", name).returncode == 0


def test_read_only_agent_is_told_its_system_bundle_stays_the_images(world: World) -> None:
    """Neither engine writes into a read-only root filesystem, so `up` says that only the CA
    variables carry the trust there, and the agent still starts."""
    name = world.new_name("ro")
    r = world.cli_up(name, "--agent-read-only")
    assert r.returncode == 0, r.stderr
    assert "system CA bundle stays the image's" in " ".join(r.stderr.split())
    ex = world.cli("exec", "--name", name, "--", "sh", "-c", "echo $SSL_CERT_FILE")
    assert ex.returncode == 0, ex.stderr
    assert ex.stdout.strip() == "/etc/keyward/ca-bundle.crt"
    assert world.cli("down", "--name", name).returncode == 0


# -- 7. the host gateway -----------------------------------------------------------------------


class _HostServer:
    """A plain HTTP server on the host side of the pair's network, bound to that one address."""

    def __init__(self, address: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"hello-from-host {self.headers.get('Host')}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_host_gateway_names_reach_a_host_server_subject_to_policy(world: World) -> None:
    gateway_ip = world.run(lambda c: c.network_inspect(world.network))["IPAM"]["Config"][0]["Gateway"]  # fmt: skip
    allowed = _HostServer(gateway_ip)
    denied = _HostServer(gateway_ip)
    name = world.new_name("hostgw")
    cfg = world.base / "hostgw.yaml"
    cfg.write_text(
        CONFIG.format(ip=world.upstream_ip).replace(
            "    other.example.test: {}\n",
            "    other.example.test: {}\n"
            f'    "host.docker.internal:{allowed.port}": {{}}\n'
            f'    "host.containers.internal:{allowed.port}": {{}}\n',
        )
    )
    try:
        r = world.cli("up", "-c", str(cfg), "--name", name, "--network", world.network)
        assert r.returncode == 0, r.stderr
        for host in ("host.docker.internal", "host.containers.internal"):
            ok = world.cli("exec", "--name", name, "--", "curl", "-sS", "-m", "10",
                           f"http://{host}:{allowed.port}/")  # fmt: skip
            assert ok.returncode == 0, ok.stderr
            assert ok.stdout == f"hello-from-host {host}:{allowed.port}"
        # the same host on a port the policy does not name: refused by the gateway
        no = world.cli("exec", "--name", name, "--", "curl", "-sS", "-m", "10", "-o", "/dev/null",
                       "-w", "%{http_code}", f"http://host.docker.internal:{denied.port}/")  # fmt: skip
        assert no.stdout != "200", no.stdout
        # the name resolves through keyward's DNS, which answers it only because a rule allows it
        dns = world.cli("exec", "--name", name, "--", "getent", "hosts", "host.docker.internal")
        assert dns.returncode == 0 and dns.stdout.split()[0] == gateway_ip, dns.stdout + dns.stderr
    finally:
        allowed.close()
        denied.close()
        world.cli("down", "--name", name)


# -- engine restart ----------------------------------------------------------------------------


def _restart_docker_daemon() -> None:
    """Stop dockerd (every container stops, as at a host reboot) and start it again, the way
    scripts/ci-setup-engines started it."""
    pidfile = Path(os.environ.get("KEYWARD_CI_RUN_DIR", "/run/keyward-ci")) / "dockerd.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)
    subprocess.run(["scripts/ci-setup-engines"], cwd=Path(__file__).resolve().parent.parent,
                   check=True, capture_output=True, timeout=300)  # fmt: skip


def _reboot_podman_pair(name: str) -> None:
    """Podman has no daemon to restart: what comes back after a reboot is what
    podman-restart.service starts (`podman start --all --filter restart-policy=always`). Stop
    the pair's containers as a shutdown would, then do exactly that, limited to this pair."""
    label = f"label={pair.LABEL_PAIR}={name}"
    subprocess.run(["podman", "stop", "--time", "2", "--filter", label],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    subprocess.run(["podman", "start", "--all", "--filter", "restart-policy=always",
                    "--filter", label], check=True, capture_output=True, timeout=120)  # fmt: skip


def _refused_by_gateway(w: World, name: str) -> None:
    """The agent gets the gateway's 403 for a name the policy denies. The address is on the pair's
    network (the fake upstream's, which need not still hold it): Podman's internal networks give
    the namespace no default route, so an off-link address fails in connect() with "network
    unreachable" before the gateway's redirect could take it."""
    r = w.cli("exec", "--name", name, "--", "curl", "-sS", "-m", "10", "-o", "/dev/null",
              "-w", "%{http_code}", "--resolve", f"evil.example.test:443:{w.upstream_ip}",
              "https://evil.example.test/")  # fmt: skip
    assert r.stdout == "403", r.stdout + r.stderr


def test_engine_restart_brings_the_pair_back_guarded(world: World) -> None:
    """Podman: the reboot path, limited to this pair. Docker: a real daemon restart, which stops
    every container on the daemon, so only with KEYWARD_TEST_ENGINE_RESTART=1."""
    if world.kind == "docker" and os.environ.get("KEYWARD_TEST_ENGINE_RESTART") != "1":
        pytest.skip("restarts the shared Docker daemon; opt in with KEYWARD_TEST_ENGINE_RESTART=1")
    name = world.new_name("reboot")
    info = world.run(lambda c: world.up(c, name, command=MARKED))
    assert _starts(world, info) == 1
    _refused_by_gateway(world, name)
    t0 = time.monotonic()
    if world.kind == "docker":
        _restart_docker_daemon()
        # the test's fake upstream has no restart policy: bring it back by hand
        ups = world.run(
            lambda c: c.container_list({"label": [f"{pair.LABEL_PAIR}={world.prefix}"]})
        )
        for u in ups:
            world.run(lambda c, i=u["Id"]: c.container_start(i))  # type: ignore[misc]
    else:
        _reboot_podman_pair(name)
    deadline = time.monotonic() + 180
    while True:
        rc, st = _status(world, name)
        if rc == 0:
            break
        assert time.monotonic() < deadline, st
        time.sleep(1)
    print(f"\n{world.kind}: engine restart -> pair healthy again in {time.monotonic() - t0:.1f} s")
    # the agent's command ran once more, and only after the gateway's rules (it is guarded)
    assert _starts(world, info) == 2
    # its traffic goes through the gateway again: a refusal from it
    _refused_by_gateway(world, name)
