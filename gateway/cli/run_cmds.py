"""`keyward run -- CMD`: the embedded default. CMD's traffic goes through an in-process gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway.cli.config_cmds import add_config_option, explained_secret_errors, load_from_args
from gateway.config.paths import state_dir
from gateway.credentials.sources import secret_env_names, withdraw_env
from gateway.errors import UsageError
from gateway.planes.resources import AcceptErrorLimiter, raise_fd_limit
from gateway.pod.privileges import make_undumpable
from gateway.runtime.assemble import build_context
from gateway.runtime.embedded import EmbeddedGateway
from gateway.runtime.reload import Reloader
from gateway.tls.ca import CertificateAuthority

# `sudo keyward run --isolate`: root's home is 0700, and the gateway drops to its own uid.
ISOLATE_STATE = "/var/lib/keyward"
PR_SET_PDEATHSIG = 1
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

COOPERATIVE_NOTE = (
    "keyward: cooperative mode: CMD runs as your user. It cannot read the gateway's memory or"
    " environment, but it can read your files (config, .env, secret files). For a separate"
    ' user with those files hidden: sudo "$(command -v keyward)" run --isolate -- CMD'
)  # sudo resets PATH: a keyward in a venv is found only by its full path


def die_with_parent(parent: int) -> Callable[[], None]:
    """For the child, between fork and exec: SIGKILL when the gateway dies (Linux), so an agent
    never runs on unguarded; if the gateway is already gone, exit at once."""

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it

    def setup() -> None:
        with contextlib.suppress(AttributeError):
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(128 + signal.SIGKILL)

    return setup


async def wait_or_drain(
    proc: asyncio.subprocess.Process,
    gw: EmbeddedGateway,
    stopping: asyncio.Event,
    seconds: float,
) -> int:
    """CMD's exit status. On SIGTERM (CMD got it too) the gateway drains as `serve` does: it
    stops accepting, lets requests and streams in flight finish for up to `seconds` while CMD
    winds down, and cuts and audits what is left; a CMD still running then is killed (it has
    no gateway any more)."""
    exited = asyncio.ensure_future(proc.wait())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            await asyncio.gather(gw.drain(seconds), asyncio.wait({exited}, timeout=seconds))
            if proc.returncode is None:
                proc.kill()
        return await exited
    finally:
        stop.cancel()


async def run_command(args: argparse.Namespace) -> int:
    make_undumpable()  # before any secret is read: the child is of our uid
    loaded = load_from_args(args)
    environ = withdraw_env(secret_env_names(loaded.config.secrets))
    # Without --state the CA lives and dies with this process: no key on disk for CMD to read.
    ca = None if args.state else CertificateAuthority.ephemeral()
    with explained_secret_errors(loaded):
        ctx = build_context(
            loaded,
            state_dir(args.state),
            audit_path=args.audit,
            agent=args.agent,
            environ=environ,
            ca=ca,
        )
    # kept for reloads: env secrets are no longer in os.environ (and live in the store anyway)
    reloader = Reloader(ctx, environ=environ)
    del environ
    print(COOPERATIVE_NOTE, file=sys.stderr)
    raise_fd_limit()
    AcceptErrorLimiter().install()
    gw = EmbeddedGateway(ctx)
    await gw.start()
    watcher = asyncio.get_running_loop().create_task(reloader.watch())
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *args.cmd, env=gw.child_env(), preexec_fn=die_with_parent(os.getpid())
            )
        except FileNotFoundError:
            raise UsageError(f"command not found: {args.cmd[0]}") from None
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def forward(sig: signal.Signals) -> None:
            proc.send_signal(sig)
            if sig == signal.SIGTERM:  # not SIGINT: Ctrl-C may only interrupt an agent's turn
                stopping.set()

        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, forward, sig)
        try:
            code = await wait_or_drain(proc, gw, stopping, args.drain)
        finally:
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)
    finally:
        watcher.cancel()
        await gw.close()
        ctx.audit.close()
    c = ctx.audit.counts
    rejected = (
        f", {c['tls_rejected']} refused keyward's certificate (`keyward doctor` shows which"
        " client ignores the trust variables)"
        if c.get("tls_rejected")
        else ""
    )
    print(
        f"keyward: {c['allowed']} allowed, {c['denied']} denied, {c['injected']} with credentials"
        f"{rejected} (audit: {ctx.audit.target})",
        file=sys.stderr,
    )
    return code if code >= 0 else 128 - code


def wait_or_kill(proc: subprocess.Popen[bytes], kill_at: list[float]) -> int:
    """CMD's exit status; once a SIGTERM has set `kill_at`, CMD is killed if it is still
    running then (its gateway is draining, then gone)."""
    while True:
        try:
            return proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            if kill_at and time.monotonic() >= kill_at[0]:
                proc.kill()


def run_isolated(args: argparse.Namespace) -> int:
    """The pod without containers: CMD in a fresh namespace, the gateway in front of it."""
    from gateway.pod.isolate import PROXY_UID, IsolatedPod, choose_agent, host_uplink
    from gateway.pod.masking import protected_paths
    from gateway.pod.netns import NetNamespace
    from gateway.pod.privileges import unreachable_ancestor, user_groups

    if os.geteuid() != 0:
        raise UsageError("--isolate needs root (network namespaces and iptables)")
    make_undumpable()
    loaded = load_from_args(args)
    environ = withdraw_env(secret_env_names(loaded.config.secrets))
    sdir = state_dir(args.state or environ.get("KEYWARD_STATE") or ISOLATE_STATE)
    blocked = unreachable_ancestor(sdir, PROXY_UID)
    if blocked is not None:
        raise UsageError(
            f"state dir {sdir}: the gateway's uid {PROXY_UID} cannot enter {blocked};"
            f" use --state DIR outside it (default for --isolate: {ISOLATE_STATE})"
        )
    if args.agent_uid is not None:
        agent_uid, agent_gid = args.agent_uid, user_groups(args.agent_uid)[0]
        workspace, who = None, f"uid {args.agent_uid} (--agent-uid)"
    else:
        sudo_uid, sudo_gid = environ.get("SUDO_UID", ""), environ.get("SUDO_GID", "")
        agent = choose_agent(
            protected_paths(loaded, sdir),
            int(sudo_uid) if sudo_uid.isdigit() else None,
            int(sudo_gid) if sudo_gid.isdigit() else None,
            Path.cwd(),
        )
        agent_uid, agent_gid, workspace, who = agent.uid, agent.gid, agent.workspace, agent.why
    print(
        f"keyward: isolated: CMD runs as {who}; the config, .env, secret files and state dir"
        " are hidden from it",
        file=sys.stderr,
    )
    audit = str(Path(args.audit).resolve()) if args.audit and args.audit != "-" else args.audit
    with NetNamespace() as ns, host_uplink(ns):
        pod = IsolatedPod(
            ns,
            loaded.path.resolve(),
            sdir,
            agent_uid=agent_uid,
            agent_gid=agent_gid,
            audit_path=audit,
            workspace=workspace,
            drain=args.drain,
        )
        try:
            pod.start(env=environ)
            env = pod.agent_env(drop=secret_env_names(loaded.config.secrets))
            proc = subprocess.Popen(pod.agent_argv(args.cmd), env=env)
            kill_at: list[float] = []  # set by SIGTERM: when CMD is killed if still running

            def forward(sig: int, _frame: object) -> None:
                proc.send_signal(sig)
                if sig == signal.SIGTERM and not kill_at:  # as `run` without --isolate
                    kill_at.append(time.monotonic() + args.drain)
                    pod.begin_stop()

            previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
            try:
                code = wait_or_kill(proc, kill_at)
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
        finally:
            pod.stop_gateway()
            shutil.rmtree(pod.work, ignore_errors=True)
    print(f"keyward: isolated run finished (namespace {ns.name} removed)", file=sys.stderr)
    return code if code >= 0 else 128 - code


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("nothing to run: keyward run [-c FILE] -- CMD [ARGS...]")
    args.cmd = cmd
    if args.isolate:
        return run_isolated(args)
    return asyncio.run(run_command(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run CMD with its traffic through an in-process gateway")
    add_config_option(p)
    p.add_argument("--audit", metavar="FILE", help='audit log (overrides audit.path; "-" = stderr)')
    p.add_argument(
        "--state",
        metavar="DIR",
        help="state dir (placeholder seed, OAuth cache; default $KEYWARD_STATE; --isolate:"
        f" {ISOLATE_STATE}); given, the CA is kept there too, else CMD gets a CA that exists"
        " only for this run",
    )
    p.add_argument("--agent", default="agent", help="agent name written to audit records")
    p.add_argument(
        "--drain",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM: seconds CMD's requests and streams in flight may take to finish"
        " (then they are cut and CMD is killed)",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="Linux, root: CMD in its own network namespace; no way out but the gateway",
    )
    p.add_argument(
        "--agent-uid",
        type=int,
        metavar="UID",
        help="with --isolate: the uid CMD runs as. Default: $SUDO_UID, unless that user owns"
        " the config, .env, a secret file or the state dir; then a dedicated uid (user"
        " keyward-agent, else 10102) with the current directory mapped to it, so CMD can edit"
        " it and what it writes stays yours. Either way the config, .env, file: secrets, the"
        " state dir and the control socket are hidden from CMD",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    p.set_defaults(func=cmd_run)
