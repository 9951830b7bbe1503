"""A pod without containers: `keyward run --isolate` and the attack tests share this.

The gateway (`keyward serve`, as root until it has applied the rules, then the proxy uid) and
the agent (an unprivileged uid, no proxy variables needed) share one fresh network namespace
whose only way out is its uplink. Teardown removes everything that was made, even on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gateway.config.loader import load_config
from gateway.errors import KeywardError, NetnsError
from gateway.netfilter.rules import PodPorts
from gateway.pod.masking import MountPlan, Workspace, make_mask_sources, protected_paths
from gateway.pod.netns import (
    STOP_GRACE,
    NetNamespace,
    VethLink,
    ip,
    setpriv_argv,
    unique_name,
)
from gateway.pod.privileges import blocked_ancestors
from gateway.tls.trust import SYSTEM_BUNDLE_PATHS

# Shared address space (RFC 6598) for the uplink /30: never a destination of anything.
UPLINK_HOST = "100.64.{n}.1"
UPLINK_POD = "100.64.{n}.2"
READY_TIMEOUT = 30.0
PROXY_UID = 10101
AGENT_USER = "keyward-agent"
AGENT_UID = 10102  # the dedicated agent uid when no `keyward-agent` user exists


@dataclass(frozen=True)
class AgentIdentity:
    uid: int
    gid: int
    workspace: Workspace | None
    why: str


def dedicated_agent_ids() -> tuple[int, int]:
    """The `keyward-agent` user's uid/gid if it exists, else 10102/10102."""
    try:
        pw = pwd.getpwnam(AGENT_USER)
    except KeyError:
        return AGENT_UID, AGENT_UID
    return pw.pw_uid, pw.pw_gid


def choose_agent(
    protected: list[Path], invoker: int | None, invoker_gid: int | None, cwd: Path
) -> AgentIdentity:
    """Who CMD runs as under `run --isolate` when `--agent-uid` is not given.

    The invoking user (`$SUDO_UID`), unless they own something that holds a secret (config,
    .env, a secret file, the state dir): then a dedicated uid that owns nothing, with the
    current directory idmapped so the agent can edit it and what it writes stays the user's.
    Without `$SUDO_UID` (root itself), the dedicated uid, unmapped."""
    owned = [p for p in protected if invoker is None or p.stat().st_uid == invoker]
    if invoker is not None and not owned:
        gid = invoker if invoker_gid is None else invoker_gid
        return AgentIdentity(invoker, gid, None, f"your uid {invoker}")
    uid, gid = dedicated_agent_ids()
    why = f"the dedicated uid {uid}"
    st = cwd.stat()
    home = None
    if invoker is not None:
        with contextlib.suppress(KeyError):
            home = Path(pwd.getpwuid(invoker).pw_dir).resolve()
    if invoker is None or st.st_uid != invoker or cwd.resolve() == home:
        return AgentIdentity(uid, gid, None, why)
    # The rest of the user's home is hidden even where it is world-readable (0755 homes hold
    # 0644 token files: ~/.npmrc, tool configs); else what the agent could not enter anyway.
    real = cwd.resolve()
    blocked = blocked_ancestors(real, uid, {gid})
    reveal = home if home is not None and home in real.parents else None
    if reveal is None and blocked:
        reveal = blocked[-1]
    ws = Workspace(str(real), st.st_uid, st.st_gid, str(reveal) if reveal else None)
    return AgentIdentity(uid, gid, ws, f"{why}, with {ws.path} mapped to it")


class LogPump:
    """Reads the gateway's stderr for as long as it runs. Unread, the pipe fills (64 KiB: a few
    hundred warnings, say one per agent connection that does not trust the CA) and the
    gateway blocks in its next log write, with every agent connection. Lines are kept (the
    last `keep`) for a start-up failure's message; once `forward` is set they also go to our
    stderr, as the gateway of a plain `keyward run` logs there."""

    def __init__(self, stream: IO[bytes], out: IO[str] | None = None, keep: int = 200) -> None:
        self.tail: deque[str] = deque(maxlen=keep)
        self.forward = False
        self._out = out if out is not None else sys.stderr
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace")
                self.tail.append(line)
                if self.forward:
                    with contextlib.suppress(OSError, ValueError):
                        self._out.write(line)
                        self._out.flush()

    def text(self, wait: float = 2.0) -> str:
        """What was logged (the last lines), once the stream ended or after `wait` seconds."""
        self._thread.join(wait)
        return "".join(self.tail)


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
    workspace: Workspace | None = None
    gateway: subprocess.Popen[bytes] | None = None
    gateway_log: LogPump | None = None
    mounts: MountPlan | None = None
    drain: float = 10.0  # `serve --drain`: how long a stopping gateway lets streams finish

    @property
    def control_dir(self) -> Path:
        return self.state_dir / "control"

    @property
    def agent_home(self) -> Path:
        return self.work / "home"

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
            "--control-socket", str(self.control_dir / "keyward.sock"),
            "--agent-uid", str(self.agent_uid),
            "--agent-gid", str(self.agent_gid),
            "--agent-masked",
            "--trust-dir", str(self.trust_dir),
            "--trust-mount", str(self.trust_dir),
            "--metrics-port", str(self.ports.control),
            "--drain", f"{self.drain:g}",
        ]  # fmt: skip
        if self.audit_path:
            argv += ["--audit", self.audit_path]
        return argv

    def start(self, env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)
        os.chown(self.work, self.proxy_uid, self.proxy_uid)
        self.prepare_agent_view()
        self.gateway = self.ns.exec(
            self.serve_argv(), env=dict(env or os.environ), stderr=subprocess.PIPE
        )
        assert self.gateway.stderr is not None
        self.gateway_log = LogPump(self.gateway.stderr)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.gateway.poll() is not None:
                err = self.gateway_log.text()
                raise KeywardError(f"gateway exited during start-up: {err.strip()[-2000:]}")
            if time.monotonic() > deadline:
                raise KeywardError(f"gateway not ready after {timeout:.0f} s")
            time.sleep(0.05)
        self.gateway_log.forward = True

    def prepare_agent_view(self) -> None:
        """What the agent's mount namespace will mask (the gateway is told, so it does not
        refuse a readable secret file the agent cannot see), and a home of its own."""
        loaded = load_config(self.config)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.control_dir.mkdir(mode=0o700, exist_ok=True)
        empty_file, empty_dir = make_mask_sources(self.work / "mask")
        self.mounts = MountPlan(
            masks=tuple(str(p) for p in protected_paths(loaded, self.state_dir, self.control_dir)),
            empty_file=str(empty_file),
            empty_dir=str(empty_dir),
            agent_uid=self.agent_uid,
            agent_gid=self.agent_gid,
            workspace=self.workspace,
            trust_bundle=str(self.trust_dir / "ca-bundle.crt"),
            system_bundles=SYSTEM_BUNDLE_PATHS,
        )
        self.agent_home.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.agent_home, self.agent_uid, self.agent_gid)

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
        env["HOME"] = self._home(env.get("HOME"))
        return env

    def _home(self, given: str | None) -> str:
        """The agent's own home if it has one (`sudo` passes root's), else one for this run."""
        candidates = [given]
        with contextlib.suppress(KeyError):
            candidates.append(pwd.getpwuid(self.agent_uid).pw_dir)
        for c in candidates:
            with contextlib.suppress(OSError, TypeError):
                if c and os.stat(c).st_uid == self.agent_uid:
                    return c
        return str(self.agent_home)

    def agent_argv(self, argv: list[str]) -> list[str]:
        """`argv` as the agent: in the pod's network namespace, in a mount namespace of its
        own where secrets are masked, as the agent uid."""
        inner = [*setpriv_argv(self.agent_uid, self.agent_gid), *argv]
        if self.mounts is None:
            raise KeywardError("the agent's view is prepared by start(); start the pod first")
        return self.ns.argv([*self.mounts.argv(), "--", *inner])

    def run_agent(
        self, argv: list[str], env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(
            self.agent_argv(argv), env=dict(env or self.agent_env()), text=True, check=False, **kw
        )

    def begin_stop(self) -> None:
        """SIGTERM the gateway: it stops accepting and drains (up to `drain`) while the agent
        winds down; `stop_gateway` then waits for it."""
        if self.gateway is not None and self.gateway.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.gateway.send_signal(signal.SIGTERM)

    def stop_gateway(self, kill: bool = False) -> None:
        if self.gateway is None:
            return
        if kill:
            self.gateway.kill()
        self.ns.stop(self.gateway, grace=self.drain + STOP_GRACE)  # a drain is not cut short
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
