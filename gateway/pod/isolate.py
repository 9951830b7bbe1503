"""A pod without containers: `keyward run --isolate` and the attack tests share this.

The gateway (`keyward serve`, as root until it has applied the rules, then the proxy uid) and
the agent (an unprivileged uid, no proxy variables needed) share one fresh network namespace
whose only way out is its uplink. Teardown removes everything that was made, even on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.cli.errors import KeywardError
from gateway.netfilter.rules import PodPorts
from gateway.pod.netns import NetNamespace, NetnsError, VethLink, ip, unique_name

# Shared address space (RFC 6598) for the uplink /30: never a destination of anything.
UPLINK_HOST = "100.64.{n}.1"
UPLINK_POD = "100.64.{n}.2"
READY_TIMEOUT = 30.0
PROXY_UID = 10101


@dataclass
class IsolatedPod:
    """The gateway half runs as soon as `start` returns; `agent_argv` runs commands as the agent."""

    ns: NetNamespace
    config: Path
    state_dir: Path
    proxy_uid: int = PROXY_UID
    agent_uid: int = 65534
    agent_gid: int = 65534
    ports: PodPorts = field(default_factory=PodPorts)
    audit_path: str | None = None
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="keyward-pod-")))
    gateway: subprocess.Popen[bytes] | None = None

    @property
    def trust_dir(self) -> Path:
        return self.work / "trust"

    @property
    def ready_file(self) -> Path:
        return self.work / "ready"

    def serve_argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "gateway", "serve",
            "-c", str(self.config),
            "--state", str(self.state_dir),
            "--proxy-uid", str(self.proxy_uid),
            "--transparent-port", str(self.ports.transparent),
            "--explicit-port", str(self.ports.explicit),
            "--dns-port", str(self.ports.dns),
            "--ready-file", str(self.ready_file),
            "--control-socket", str(self.state_dir / "control" / "keyward.sock"),
            "--trust-dir", str(self.trust_dir),
            "--trust-mount", str(self.trust_dir),
            "--metrics-port", str(self.ports.control),
        ]  # fmt: skip
        if self.audit_path:
            argv += ["--audit", self.audit_path]
        return argv

    def start(self, env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)
        os.chown(self.work, self.proxy_uid, self.proxy_uid)
        self.gateway = self.ns.exec(
            self.serve_argv(), env=dict(env or os.environ), stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.gateway.poll() is not None:
                err = (
                    self.gateway.stderr.read().decode(errors="replace")
                    if self.gateway.stderr
                    else ""
                )
                raise KeywardError(f"gateway exited during start-up: {err.strip()[-2000:]}")
            if time.monotonic() > deadline:
                raise KeywardError(f"gateway not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def agent_env(
        self, base: Mapping[str, str] | None = None, drop: frozenset[str] = frozenset()
    ) -> dict[str, str]:
        """Trust variables and placeholders from the gateway's trust.env; no proxy variables
        (traffic is redirected in the kernel); nothing a secret was read from."""
        env = {
            k: v
            for k, v in (base if base is not None else os.environ).items()
            if k not in drop and "PROXY" not in k.upper() and not k.startswith("KEYWARD_")
        }
        for line in (self.trust_dir / "trust.env").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                env[key] = value
        env.setdefault("HOME", str(self.work))
        return env

    def agent_argv(self, argv: list[str]) -> list[str]:
        return self.ns.argv(argv, uid=self.agent_uid, gid=self.agent_gid)

    def run_agent(
        self, argv: list[str], env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(
            self.agent_argv(argv), env=dict(env or self.agent_env()), text=True, check=False, **kw
        )

    def stop_gateway(self, kill: bool = False) -> None:
        if self.gateway is None:
            return
        if kill:
            self.gateway.kill()
        self.ns.stop(self.gateway)
        self.gateway = None


def _iptables(action: str, table: str, chain: str, spec: list[str]) -> str | None:
    """`iptables -t TABLE ACTION CHAIN SPEC` (the table option comes before the command);
    returns its error text, or None on success."""
    argv = ["iptables", "-w", "-t", table, action, chain, *spec]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}"
    return None


def uplink_rules(pod_addr: str, host_dev: str, tag: str) -> list[tuple[str, str, list[str]]]:
    """(table, chain, spec) of the host rules an uplink needs: NAT for the pod's address, and
    forwarding both ways even where the FORWARD policy is DROP (as Docker sets it)."""
    mark = ["-m", "comment", "--comment", tag]
    replies = ["-o", host_dev, "-d", f"{pod_addr}/32", "-m", "conntrack", "--ctstate"]
    return [
        ("nat", "POSTROUTING", ["-s", f"{pod_addr}/32", *mark, "-j", "MASQUERADE"]),
        ("filter", "FORWARD", ["-i", host_dev, "-s", f"{pod_addr}/32", *mark, "-j", "ACCEPT"]),
        ("filter", "FORWARD", [*replies, "RELATED,ESTABLISHED", *mark, "-j", "ACCEPT"]),
    ]


def _free_uplink_subnet() -> int:
    """An `n` whose 100.64.n.0/30 no interface on the host uses (parallel isolated runs)."""
    used = ip("-4", "-o", "addr", "show")
    free = [n for n in range(1, 251) if f" {UPLINK_HOST.format(n=n)}/" not in used]
    if not free:
        raise KeywardError("no free uplink subnet in 100.64.1-250.0/30")
    return free[int.from_bytes(os.urandom(2), "big") % len(free)]


@contextlib.contextmanager
def host_uplink(ns: NetNamespace) -> Iterator[None]:
    """Egress for a real `run --isolate`: a veth to the host, NAT and forwarding rules on the
    host, forwarding on. Everything is undone on exit, including the forwarding setting; a
    step of the teardown that fails is reported (raised) after the others have run, never
    left behind silently."""
    n = _free_uplink_subnet()
    host_addr, pod_addr = UPLINK_HOST.format(n=n), UPLINK_POD.format(n=n)
    link = VethLink(ns, None, left_name=unique_name() + "p", right_name=unique_name() + "h")
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    before = fwd.read_text().strip()
    rules = uplink_rules(pod_addr, link.right_name, f"keyward-isolate {ns.name}")
    added: list[tuple[str, str, list[str]]] = []
    try:
        link.create()
        link.add_address("left", f"{pod_addr}/30")
        link.add_address("right", f"{host_addr}/30")
        link.add_route("left", "default", via=host_addr)
        for table, chain, spec in rules:
            err = _iptables("-I", table, chain, spec)
            if err is not None:
                raise KeywardError(f"cannot set up the uplink: {err}")
            added.append((table, chain, spec))
        fwd.write_text("1\n")
        yield
    finally:
        errors = [e for t, c, s in reversed(added) if (e := _iptables("-D", t, c, s))]
        try:
            fwd.write_text(before + "\n")
        except OSError as e:
            errors.append(f"restoring {fwd}: {e}")
        try:
            link.delete()
        except NetnsError as e:
            errors.append(str(e))
        if errors:
            raise KeywardError("uplink teardown incomplete: " + "; ".join(errors))
