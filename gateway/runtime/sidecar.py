"""`keyward serve`: the gateway half of a pod.

Order is the security argument: load secrets and the CA as root, apply the netfilter rules,
drop to the proxy uid with no capabilities, and only then listen. If this process dies, the
rules stay in the kernel and redirected connections are refused: nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config.compile import parse_nameservers
from gateway.config.loader import LoadedConfig
from gateway.credentials.oauth import TokenMinter
from gateway.credentials.placeholders import install_seed
from gateway.credentials.sources import secret_env_names, secret_files, withdraw_env
from gateway.dns.resolver import Resolver
from gateway.dns.server import DnsListener
from gateway.errors import UsageError
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.netfilter.rules import PodPorts, render_all
from gateway.planes.context import GatewayContext
from gateway.planes.drain import drain_planes
from gateway.planes.http.proxy import HttpPlane
from gateway.planes.mitm.master import MitmPlane, start_mitm
from gateway.planes.resources import AcceptErrorLimiter, raise_fd_limit
from gateway.planes.transparent import make_verifier
from gateway.pod.privileges import (
    chown_tree,
    drop_to,
    make_undumpable,
    readable_by,
    user_groups,
)
from gateway.runtime.assemble import build_context, freeze_startup_heap
from gateway.runtime.reload import Reloader
from gateway.tls.trust import render_agent_trust

log = logging.getLogger("keyward.serve")


@dataclass
class ServeOptions:
    state_dir: Path
    proxy_uid: int
    proxy_gid: int
    ports: PodPorts = field(default_factory=PodPorts)
    netfilter: bool = True
    netns: str | None = None
    ready_file: Path | None = None
    control_socket: Path | None = None
    drain_seconds: float = 10.0
    agent: str = "agent"
    audit_path: str | None = None
    trust_dir: Path | None = None
    trust_mount: str = "/etc/keyward"
    # Also serve the control endpoints (health, readiness, /metrics) on this TCP port of every
    # address (Prometheus, kubelet probes). The netfilter rules keep it closed to agent uids.
    metrics_port: int | None = None
    # The uid (and gid) agents run as, and whether their mount namespace masks the secret
    # files (`keyward run --isolate`); unmasked, a secret file they could read stops start-up.
    agent_uid: int = 1000
    agent_gid: int | None = None
    agent_masked: bool = False
    placeholder_seed: Path | None = None  # a seed file to use (kube render puts one in a Secret)


def refuse_exposed_secret_files(loaded: LoadedConfig, uid: int, gid: int | None) -> None:
    """Every `file:` secret source and the `.env` must be unreadable by the agent's uid (mode
    bits and the directories on the way); named in the error, never read for it."""
    primary, gids = user_groups(uid, gid)
    files = {
        f"secret {name!r}: file {path}": path
        for name, path in secret_files(loaded.config.secrets, loaded.base_dir).items()
    }
    dotenv = loaded.base_dir / ".env"
    if dotenv.is_file():
        files[f"{dotenv}"] = dotenv
    exposed = []
    for what, path in files.items():
        try:
            if readable_by(path, uid, gids):
                mode = path.stat().st_mode & 0o777
                exposed.append(
                    f"{what} is readable by the agent's uid {uid} (mode {mode:04o});"
                    f" run: chmod 600 {path}"
                )
        except OSError:
            continue  # missing: the loader says so, naming the secret
    if exposed:
        raise UsageError(
            "\n".join(exposed) + f"\nkeyward serve does not start while the agent (uid {uid},"
            f" gid {primary}; --agent-uid) could read a secret"
        )


def write_agent_trust(ctx: GatewayContext, out: Path, mount: str) -> None:
    """The agent's half: CA certificate and bundle, trust.env with every CA variable and the
    placeholder values (fakes, safe to share). Never the key, never a real value."""
    render_agent_trust(ctx.ca, out, f"{mount}/ca-bundle.crt")
    with (out / "trust.env").open("a") as f:
        for ph in ctx.placeholders:
            f.write(f"{ph.env}={ph.value}\n")


def ready_stamp() -> tuple[str, socket.socket | None]:
    """The ready file's content and the socket that keeps it true.

    `net:[inode] @keyward-ready-<token>`: this network namespace and an abstract unix socket
    bound in it for as long as this process serves. Abstract sockets belong to their namespace
    (the agent sees them in its /proc/net/unix), so a file left from an earlier namespace never
    counts: its token names no socket in the new one, even when the kernel gives the new
    namespace the old one's inode number."""
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        return "ready\n", None
    name = f"keyward-ready-{secrets.token_hex(12)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
    except OSError:
        sock.close()
        return f"{netns}\n", None
    return f"{netns} @{name}\n", sock


@dataclass
class Sidecar:
    ctx: GatewayContext
    opts: ServeOptions
    dns: DnsListener | None = None
    mitm: MitmPlane | None = None
    http: HttpPlane | None = None
    control: web.AppRunner | None = None
    minter: TokenMinter | None = None
    ready: bool = False
    ready_socket: socket.socket | None = None
    reloader: Reloader | None = None
    # The secret variables as read at start: they are withdrawn from os.environ, and a reload
    # must find them again (their values are in the store anyway).
    environ: dict[str, str] = field(default_factory=dict, repr=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    def prepare(cls, loaded: LoadedConfig, opts: ServeOptions) -> Sidecar:
        """The privileged part: secrets, CA, rules, then the irreversible drop."""
        if opts.ready_file is not None:  # a previous run's file must not announce this one
            with contextlib.suppress(FileNotFoundError):
                opts.ready_file.unlink()
        make_undumpable()
        if not opts.agent_masked:
            refuse_exposed_secret_files(loaded, opts.agent_uid, opts.agent_gid)
        if opts.placeholder_seed is not None:
            install_seed(opts.state_dir, opts.placeholder_seed)
        environ = withdraw_env(secret_env_names(loaded.config.secrets))
        ctx = build_context(
            loaded, opts.state_dir, audit_path=opts.audit_path, agent=opts.agent, environ=environ
        )
        ctx.metrics = Metrics(audit_errors=lambda: ctx.audit.write_errors)
        if opts.trust_dir is not None:
            write_agent_trust(ctx, opts.trust_dir, opts.trust_mount)
        services = {s.listen for s in loaded.config.services.values() if s.listen}
        opts.ports = replace(
            opts.ports, services=tuple(sorted(services | set(opts.ports.services)))
        )
        if opts.netfilter:
            from gateway.netfilter.apply import apply

            apply(render_all(opts.proxy_uid, opts.ports), netns=opts.netns)
            log.info("netfilter rules applied (proxy uid %d)", opts.proxy_uid)
        if opts.control_socket is not None:
            opts.control_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() == 0 and opts.proxy_uid != 0:
            chown_tree(opts.state_dir, opts.proxy_uid, opts.proxy_gid)
            if opts.control_socket is not None:
                os.chown(opts.control_socket.parent, opts.proxy_uid, opts.proxy_gid)
            drop_to(opts.proxy_uid, opts.proxy_gid)
            log.info("dropped to uid %d with no capabilities", opts.proxy_uid)
        return cls(ctx, opts, environ=environ)

    async def start(self) -> None:
        p = self.opts.ports
        self.minter = self.ctx.start_token_minter()
        upstream = self.ctx.config.config.upstream
        resolver = Resolver.from_upstream_config(
            upstream.resolve, upstream=parse_nameservers(upstream.nameservers)
        )
        # Every agent query arrives from 127.0.0.1 and glibc does not cache: a parallel
        # package install asks A and AAAA per connection, so the per-client bucket is generous.
        self.dns = DnsListener(
            self.ctx.policy, resolver, audit=self.ctx.record, rate=500.0, burst=2000
        )
        await self.dns.start("127.0.0.1", p.dns)
        verifier = make_verifier(self.dns.names_for, self.ctx.connect_target)
        self.mitm = await start_mitm(
            self.ctx,
            [f"transparent@127.0.0.1:{p.transparent}", f"regular@127.0.0.1:{p.explicit}"],
            verify_transparent=verifier,
        )
        self.http = HttpPlane(self.ctx)
        await self.http.start("127.0.0.1")
        if self.opts.control_socket is not None or self.opts.metrics_port:
            await self._start_control(self.opts.control_socket)
        freeze_startup_heap()
        self._start_reloader()
        self.ready = True
        if self.opts.ready_file is not None:
            stamp, self.ready_socket = ready_stamp()
            self.opts.ready_file.write_text(stamp)
        log.info("ready: transparent %d, explicit %d, dns %d", p.transparent, p.explicit, p.dns)

    async def _start_control(self, path: Path | None) -> None:
        """Health, readiness, metrics and credential health on a unix socket in a 0700 dir,
        and on `metrics_port` when set: neither is reachable from the agent."""

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def readyz(_: web.Request) -> web.Response:
            return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

        metrics = self.ctx.metrics

        async def metrics_page(_: web.Request) -> web.Response:
            body = metrics.exposition() if metrics is not None else b""
            return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

        async def credentials(_: web.Request) -> web.Response:
            return web.json_response(metrics.credentials() if metrics is not None else {})

        app = web.Application()

        async def reload(_: web.Request) -> web.Response:
            ok = self.reloader is not None and await self.reloader.reload()
            body = {"reloaded": ok, "policy": self.ctx.config.digest}
            return web.json_response(body, status=200 if ok else 409)

        app.router.add_post("/reload", reload)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics_page)
        app.router.add_get("/credentials", credentials)
        self.control = web.AppRunner(app, access_log=None)
        await self.control.setup()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await web.UnixSite(self.control, str(path)).start()
            path.chmod(0o600)
        if self.opts.metrics_port:
            await web.TCPSite(self.control, None, self.opts.metrics_port).start()

    def reload(self) -> None:
        """SIGHUP: reload config and secrets (which also reopens the audit log)."""
        if self.reloader is None:
            self.ctx.audit.reopen()
            return
        task = asyncio.get_running_loop().create_task(self.reloader.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_reloader(self) -> None:
        self.reloader = Reloader(self.ctx, environ=self.environ)

        def repoint_dns(ctx: GatewayContext) -> None:
            if self.dns is not None:
                self.dns.policy = ctx.policy

        self.reloader.on_reload.append(repoint_dns)
        task = asyncio.get_running_loop().create_task(self.reloader.watch())
        self._tasks.add(task)

    async def close(self) -> None:
        if self.ready_socket is not None:
            self.ready_socket.close()
        self.ready = False
        for task in list(self._tasks):
            task.cancel()
        # stop accepting; in-flight requests and streams on both planes get up to --drain
        await drain_planes(self.opts.drain_seconds, self.mitm, self.http)
        if self.opts.ready_file is not None:
            with contextlib.suppress(OSError):
                self.opts.ready_file.unlink()
        for closer in (
            self.mitm.close if self.mitm else None,
            self.http.close if self.http else None,
            self.dns.close if self.dns else None,
            self.control.cleanup if self.control else None,
            self.minter.close if self.minter else None,
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closer(), self.opts.drain_seconds)
        self.ctx.audit.close()


async def serve(loaded: LoadedConfig, opts: ServeOptions) -> int:
    raise_fd_limit()  # before dropping privileges: the hard limit may only be raised as root
    sidecar = Sidecar.prepare(loaded, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    AcceptErrorLimiter().install(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload)
    try:
        await sidecar.start()
        await stop.wait()
        log.info("stopping (drain bound %.0f s)", opts.drain_seconds)
    finally:
        await sidecar.close()
    return 0
