"""Attack the pod rules for real: an agent uid in a namespace tries every way out.

A "pod" namespace holds stand-in gateway listeners (run as the proxy uid) and the agent; an
"upstream" namespace holds fake hosts on documentation addresses that count every connection
and datagram. The rules are applied with the real `apply`, then the agent probes. Each refusal
must be an active one (a TCP reset or an ICMP error, seen as the errno it raises), never a
silent drop: a dropped packet leaves the agent hanging until its own timeout, and hangs break
agents.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.cli.main import main
from gateway.netfilter.apply import apply, remove, verify
from gateway.netfilter.rules import CHAINS, PodPorts, render_all
from gateway.pod.netns import NetNamespace, Topology
from tests.support.wait import wait_until

pytestmark = pytest.mark.root

PROXY_UID = 10101
AGENT_UID = 1000
PORTS = PodPorts(transparent=8080, explicit=8081, dns=8053, services=(8701,), control=8090)
AGENT_DEV_PORT = 3000  # agent_ports_ok: the agent's own dev server
HANG = 20  # seconds a probe waits before calling it a hang: a bound only, never a speed test
UPSTREAM = "203.0.113.10"
UPSTREAM6 = "2001:db8:1::10"

# One process, many sockets. Prints "ready" once bound, then one JSON line per connection or
# datagram. TCP replies "<name> <original destination>"; UDP replies "<name> <payload>".
LISTENERS = r"""
import json, selectors, socket, struct, sys
sel = selectors.DefaultSelector()
for item in json.loads(sys.argv[1]):
    v6 = ":" in item["host"]
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    kind = socket.SOCK_STREAM if item["proto"] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((item["host"], item["port"]))
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    sel.register(s, selectors.EVENT_READ, item)
print("ready", flush=True)

def original_dst(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    except OSError:
        return "-"
    return "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])

while True:
    for key, _ in sel.select():
        sock, item = key.fileobj, key.data
        if item["proto"] == "tcp":
            conn, peer = sock.accept()
            orig = original_dst(conn) if conn.family == socket.AF_INET else "-"
            print(json.dumps({"name": item["name"], "peer": peer[0], "orig": orig}), flush=True)
            conn.sendall(("%s %s\n" % (item["name"], orig)).encode())
            conn.close()
        else:
            data, peer = sock.recvfrom(4096)
            print(json.dumps({"name": item["name"], "peer": peer[0]}), flush=True)
            sock.sendto(item["name"].encode() + b" " + data, peer)
"""

# Runs each probe and prints one JSON result per probe: ok, reply or error, the errno name of
# a failure ("timeout" when nothing came back within HANG: a drop), and seconds taken (printed).
PROBE = r"""
import errno, json, socket, sys, time
HANG = float(sys.argv[2])
def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
def tcp(host, port):
    with socket.socket(fam(host), socket.SOCK_STREAM) as s:
        s.settimeout(HANG)
        s.connect((host, port))
        return s.recv(200).decode().strip()
def udp(host, port):
    with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
        s.settimeout(HANG)
        s.connect((host, port))
        s.send(b"hello")
        s.recv(4096)  # an ICMP error arrives here as ECONNREFUSED
        s.send(b"hello")
        return s.recv(4096).decode()
def ping(host, _port):
    proto = socket.IPPROTO_ICMPV6 if ":" in host else socket.IPPROTO_ICMP
    kind = 128 if ":" in host else 8
    with socket.socket(fam(host), socket.SOCK_DGRAM, proto) as s:
        s.settimeout(HANG)
        if ":" in host:  # like iputils ping: ICMPv6 errors are only reported when asked for
            s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR
        s.sendto(bytes([kind, 0, 0, 0, 0, 0, 0, 1]) + b"keyward", (host, 0))
        return "reply type %d" % s.recv(200)[0]
out = []
for kind, host, port in json.loads(sys.argv[1]):
    t0 = time.monotonic()
    try:
        res = {"ok": True, "reply": {"tcp": tcp, "udp": udp, "ping": ping}[kind](host, port)}
    except TimeoutError as e:
        res = {"ok": False, "error": "timeout: %s" % e, "errno": "timeout"}
    except OSError as e:
        res = {"ok": False, "error": "%s: %s" % (type(e).__name__, e),
               "errno": errno.errorcode.get(e.errno or 0, str(e.errno))}
    res["seconds"] = round(time.monotonic() - t0, 3)
    out.append(res)
print(json.dumps(out))
"""


@dataclass
class Listener:
    """A listener process and the events it printed, collected by a reader thread."""

    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)

    def names(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if name is None or e["name"] == name]


def start_listeners(ns: NetNamespace, spec: list[dict[str, Any]], uid: int | None) -> Listener:
    proc = ns.exec(
        [sys.executable, "-I", "-c", LISTENERS, json.dumps(spec)],
        uid=uid,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready = threading.Event()
    listener = Listener(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "ready":
                ready.set()
            elif line.strip():
                listener.events.append(json.loads(line))
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(15) or proc.poll() is not None:
        err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        raise RuntimeError(f"listeners did not start: {err}")
    return listener


@dataclass
class Pod:
    topo: Topology
    rendered: dict[int, str]
    gateway: Listener
    transparent: Listener
    upstream: Listener

    @property
    def ns(self) -> str:
        return self.topo.pod.name

    def probe(self, probes: list[tuple[str, str, int]], uid: int = AGENT_UID) -> list[dict]:
        res = self.topo.pod.run(
            [sys.executable, "-I", "-c", PROBE, json.dumps(probes), str(HANG)],
            uid=uid,
            timeout=HANG * (len(probes) + 1) + 30,
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def one(self, kind: str, host: str, port: int, uid: int = AGENT_UID) -> dict[str, Any]:
        return self.probe([(kind, host, port)], uid)[0]

    def live(self) -> str:
        """Our chains and OUTPUT jumps as iptables prints them, both families."""
        out = []
        for tool in ("iptables", "ip6tables"):
            for table in CHAINS:
                res = self.topo.pod.run([tool, "-w", "-t", table, "-S"], check=True)
                out += [line for line in res.stdout.splitlines() if "KEYWARD" in line]
        return "\n".join(out)


def transparent_spec() -> list[dict[str, Any]]:
    return [{"name": "transparent", "proto": "tcp", "host": "127.0.0.1", "port": 8080}]


# What an active refusal raises in the agent: a TCP reset (ECONNREFUSED), or for a datagram a
# rejected send (EPERM) or an ICMP error (ECONNREFUSED). A silent drop ends in "timeout".
REFUSED = {"tcp": {"ECONNREFUSED"}, "udp": {"EPERM", "ECONNREFUSED"}}
REFUSED["ping"] = REFUSED["udp"]


def assert_refused(pod: Pod, kind: str, host: str, port: int) -> None:
    res = pod.one(kind, host, port)
    assert not res["ok"], f"{kind} {host}:{port}: expected a refusal, got {res}"
    assert res.get("errno") in REFUSED[kind], f"{kind} {host}:{port} not refused at once: {res}"
    print(f"\n{kind} {host}:{port} refused: {res['errno']} after {res['seconds']} s")


def settle() -> None:
    """Before checking that nothing arrived: give the listeners' reader threads a moment to
    record what already happened (a slow thread can only make such a check pass wrongly)."""
    time.sleep(0.2)


@pytest.fixture(scope="module")
def pod(root_ok: None) -> Iterator[Pod]:
    with Topology() as topo:
        topo.pod.sysctl("net.ipv4.ping_group_range", "0 2147483647")  # ping sockets for all
        upstream_spec = []
        for host in (UPSTREAM, "198.51.100.1", UPSTREAM6, "2001:db8::1"):
            for port in (80, 443, 9999):
                upstream_spec.append(
                    {"name": f"up{port}", "proto": "tcp", "host": host, "port": port}
                )
            for port in (53, 5353):
                upstream_spec.append(
                    {"name": f"up{port}", "proto": "udp", "host": host, "port": port}
                )
        upstream = start_listeners(topo.upstream, upstream_spec, uid=None)
        gateway = start_listeners(
            topo.pod,
            [
                {"name": "explicit", "proto": "tcp", "host": "127.0.0.1", "port": 8081},
                {"name": "dns", "proto": "udp", "host": "127.0.0.1", "port": 8053},
                {"name": "dns-tcp", "proto": "tcp", "host": "127.0.0.1", "port": 8053},
                {"name": "service", "proto": "tcp", "host": "127.0.0.1", "port": 8701},
                # the control endpoint on every address, v4 and v6: the rules alone protect it
                {"name": "control", "proto": "tcp", "host": "0.0.0.0", "port": 8090},
                {"name": "control6", "proto": "tcp", "host": "::", "port": 8090},
            ],
            uid=PROXY_UID,
        )
        transparent = start_listeners(topo.pod, transparent_spec(), uid=PROXY_UID)
        rendered = render_all(PROXY_UID, PORTS, agent_ports_ok=(AGENT_DEV_PORT,))
        apply(rendered, netns=topo.pod.name)
        yield Pod(topo, rendered, gateway, transparent, upstream)


def test_agent_tcp_to_any_port_lands_at_transparent_listener_with_original_dst(pod: Pod) -> None:
    before = len(pod.upstream.events)
    targets = [(UPSTREAM, 80), (UPSTREAM, 9999), ("198.51.100.1", 443), ("192.0.2.10", 1)]
    results = pod.probe([("tcp", host, port) for host, port in targets])
    for (host, port), res in zip(targets, results, strict=True):
        assert res == {**res, "ok": True, "reply": f"transparent {host}:{port}"}
    settle()
    assert len(pod.upstream.events) == before, pod.upstream.events[before:]


def test_agent_loopback_tcp_is_redirected_too_but_listeners_are_not(pod: Pod) -> None:
    res = pod.probe(
        [("tcp", "127.0.0.1", 5000), ("tcp", "127.0.0.1", 8081), ("tcp", "127.0.0.1", 8701)]
    )
    assert res[0]["reply"] == "transparent 127.0.0.1:5000"
    assert res[1]["reply"] == "explicit 127.0.0.1:8081"  # reached directly, no REDIRECT loop
    assert res[2]["reply"] == "service 127.0.0.1:8701"


def test_agent_udp_to_upstream_is_refused_fast(pod: Pod) -> None:
    before = len(pod.upstream.events)
    for host in (UPSTREAM, "198.51.100.1"):
        assert_refused(pod, "udp", host, 5353)
    settle()
    assert len(pod.upstream.events) == before


def test_agent_dns_to_any_server_lands_at_the_gateway_dns_listener(pod: Pod) -> None:
    before = len(pod.upstream.events)
    res = pod.probe([("udp", UPSTREAM, 53), ("udp", "127.0.0.1", 53), ("tcp", UPSTREAM, 53)])
    assert res[0] == {**res[0], "ok": True, "reply": "dns hello"}
    assert res[1] == {**res[1], "ok": True, "reply": "dns hello"}
    assert res[2] == {**res[2], "ok": True, "reply": f"dns-tcp {UPSTREAM}:53"}
    settle()
    assert len(pod.upstream.events) == before


def test_control_port_is_refused_to_the_agent_but_not_to_the_proxy(pod: Pod) -> None:
    for host in ("127.0.0.1", "198.51.100.2", "::1", "2001:db8::2"):
        assert_refused(pod, "tcp", host, 8090)
    settle()
    assert pod.gateway.names("control") == [] and pod.gateway.names("control6") == []
    # the listener is really there: the proxy uid reaches it (so the refusal above is the rules)
    res = pod.one("tcp", "127.0.0.1", 8090, uid=PROXY_UID)
    assert res["ok"] and res["reply"].startswith("control"), res


def test_agent_ipv6_fails_fast_and_reaches_nothing(pod: Pod) -> None:
    before = len(pod.upstream.events)
    for kind, host, port in [
        ("tcp", UPSTREAM6, 80),
        ("tcp", "2001:db8::1", 443),
        ("udp", UPSTREAM6, 53),
        ("udp", UPSTREAM6, 5353),
        ("tcp", "::1", 8081),
    ]:
        assert_refused(pod, kind, host, port)
    settle()
    assert len(pod.upstream.events) == before


def test_agent_ping_fails_while_the_proxy_uid_can_ping(pod: Pod) -> None:
    for host in (UPSTREAM, UPSTREAM6):
        assert pod.one("ping", host, 0, uid=PROXY_UID)["ok"], host  # ping sockets do work
        assert_refused(pod, "ping", host, 0)


def test_proxy_uid_reaches_the_upstream_directly(pod: Pod) -> None:
    before = len(pod.upstream.events)
    res = pod.probe(
        [
            ("tcp", UPSTREAM, 443),
            ("udp", UPSTREAM, 5353),
            ("tcp", UPSTREAM6, 9999),
            ("udp", UPSTREAM, 53),
        ],
        uid=PROXY_UID,
    )
    assert [r["reply"].split()[0] for r in res] == ["up443", "up5353", "up9999", "up53"], res
    expected = before + 6  # udp probes send twice
    wait_until(lambda: len(pod.upstream.events) >= expected, what="the upstream's 6 events")
    settle()
    assert len(pod.upstream.events) == expected


# Closes only when told, after the client process is gone: the client's final ACK then comes
# from an orphaned socket.
LATE_CLOSER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000))
s.listen(8)
print("ready", flush=True)
c, _ = s.accept()
while c.recv(100):
    pass
sys.stdin.readline()
c.close()
print("closed", flush=True)
sys.stdin.readline()
"""
CLOSE_FIRST = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2]))
c.sendall(b"x")
c.close()
"""


def test_proxy_connections_close_cleanly_after_the_socket_is_gone(pod: Pod) -> None:
    """The last ACK of a closed (ownerless) proxy socket is let out by the connmark rule."""
    server = pod.topo.upstream.exec(
        [sys.executable, "-I", "-c", LATE_CLOSER, UPSTREAM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdin is not None and server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = [sys.executable, "-I", "-c", CLOSE_FIRST, UPSTREAM, str(HANG)]
        pod.topo.pod.run(client, uid=PROXY_UID, check=True)
        server.stdin.write("close\n")  # the client process has exited: its socket is orphaned
        server.stdin.flush()
        assert server.stdout.readline().strip() == "closed"

        def connections() -> list[str]:
            ss = pod.topo.upstream.run(["ss", "-tanH"], check=True).stdout.splitlines()
            return [line for line in ss if ":7000 " in line and not line.startswith("LISTEN")]

        # the server's socket goes once the ACK of its FIN arrives; without that ACK it would
        # sit in LAST-ACK, retransmitting for minutes
        wait_until(lambda: not connections(), what="the server's connection to close")
    finally:
        pod.topo.upstream.stop(server)


def test_agent_ports_ok_reach_the_agents_own_server_directly(pod: Pod) -> None:
    spec = [{"name": "agent-dev", "proto": "tcp", "host": "127.0.0.1", "port": AGENT_DEV_PORT}]
    dev = start_listeners(pod.topo.pod, spec, uid=AGENT_UID)
    try:
        res = pod.one("tcp", "127.0.0.1", AGENT_DEV_PORT)
        assert res["reply"] == f"agent-dev 127.0.0.1:{AGENT_DEV_PORT}", res
    finally:
        pod.topo.pod.stop(dev.proc)


def test_verify_clean_and_apply_is_idempotent(pod: Pod, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(pod.rendered, netns=pod.ns) == []
    first = pod.live()
    assert first.count("-A OUTPUT -j KEYWARD-OUT") == 2  # one per family
    apply(pod.rendered, netns=pod.ns)
    apply(pod.rendered, netns=pod.ns)
    assert pod.live() == first
    assert verify(pod.rendered, netns=pod.ns) == []
    argv = ["netfilter", "verify", "--netns", pod.ns, "--proxy-uid", str(PROXY_UID)]
    argv += ["--service-port", "8701", "--agent-port", str(AGENT_DEV_PORT)]
    assert main(argv) == 0
    assert main([*argv[:-2], "--agent-port", "3001"]) == 1  # different intent = drift
    capsys.readouterr()


def test_drift_is_reported_with_a_failing_exit(
    pod: Pod, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = "-A KEYWARD-OUT -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 8081 -j ACCEPT"
    pod.topo.pod.run(["iptables", "-D", *rule.split()[1:]], check=True)
    try:
        drift = verify(pod.rendered, netns=pod.ns)
        assert drift == ["iptables -t filter KEYWARD-OUT:", f"- {rule}"]
        argv = ["netfilter", "verify", "--netns", pod.ns, "--proxy-uid", str(PROXY_UID)]
        argv += ["--service-port", "8701", "--agent-port", str(AGENT_DEV_PORT)]
        assert main(argv) == 1
        assert f"- {rule}" in capsys.readouterr().out
        pod.topo.pod.run(["iptables", "-I", "OUTPUT", "1", "-j", "ACCEPT"], check=True)
        assert any("not the first rule" in d for d in verify(pod.rendered, netns=pod.ns))
    finally:
        pod.topo.pod.run(["iptables", "-D", "OUTPUT", "-j", "ACCEPT"])
        apply(pod.rendered, netns=pod.ns)
    assert verify(pod.rendered, netns=pod.ns) == []


def test_fail_closed_when_the_transparent_listener_dies(pod: Pod) -> None:
    pod.transparent.proc.kill()  # SIGKILL, by pid
    pod.transparent.proc.wait(5)
    pod.topo.pod.stop(pod.transparent.proc)
    try:
        before = len(pod.upstream.events)
        for port in (80, 443, 9999):
            assert_refused(pod, "tcp", UPSTREAM, port)
        settle()
        assert len(pod.upstream.events) == before
    finally:
        pod.transparent = start_listeners(pod.topo.pod, transparent_spec(), uid=PROXY_UID)
    assert pod.one("tcp", UPSTREAM, 80)["reply"] == f"transparent {UPSTREAM}:80"


def test_remove_cleans_up_and_is_idempotent(pod: Pod) -> None:
    try:
        remove(netns=pod.ns)
        remove(netns=pod.ns)
        assert pod.live() == ""
        assert main(["netfilter", "remove", "--netns", pod.ns]) == 0
        # without the rules the agent does reach the upstream: the rules were what stopped it
        assert pod.one("tcp", UPSTREAM, 80)["reply"].startswith("up80 ")
    finally:
        apply(pod.rendered, netns=pod.ns)
    assert pod.one("tcp", UPSTREAM, 80)["reply"] == f"transparent {UPSTREAM}:80"


def test_topology_cleans_up_after_errors(root_ok: None) -> None:
    from gateway.pod.netns import namespaces

    with contextlib.suppress(RuntimeError), Topology() as topo:
        names = {topo.pod.name, topo.upstream.name}
        sleeper = topo.pod.exec(["sleep", "60"], uid=AGENT_UID)
        assert names <= namespaces()
        raise RuntimeError("boom")
    assert not names & namespaces()
    assert sleeper.poll() is not None
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert topo.link.left_name not in links.stdout and topo.link.right_name not in links.stdout
