"""Network namespaces, veth links and processes inside them, with iproute2 and setpriv.

Used by the tests that attack the pod rules and by `keyward run --isolate`. Every object
removes only what it created itself, also when the body of its `with` block raised, and stops
the processes it started by their pid: parallel runs and other tools are never touched.
Names are `kw-` plus random hex, short enough for interface names (15 bytes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from gateway.errors import NetnsError

log = logging.getLogger("keyward.netns")

PREFIX = "kw-"
STOP_GRACE = 3.0


def unique_name(prefix: str = PREFIX) -> str:
    """`kw-` + 8 hex digits: unique across parallel runs, fits an interface name."""
    return f"{prefix}{secrets.token_hex(4)}"


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip ARGS` (inside `netns` if given) and return stdout."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def stop_process(proc: subprocess.Popen[Any], grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped, by pid only."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(grace)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def setpriv_argv(uid: int, gid: int | None = None) -> list[str]:
    """The prefix that runs a command as `uid`/`gid` (default gid = uid) with no other group."""
    g = uid if gid is None else gid
    return ["setpriv", f"--reuid={uid}", f"--regid={g}", "--clear-groups"]


class NetNamespace:
    """A named network namespace that exists for the life of the `with` block."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name()
        self.created = False
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NetNamespace:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def create(self) -> None:
        ip("netns", "add", self.name)
        self.created = True
        self.enable_loopback()

    def enable_loopback(self) -> None:
        """A new namespace has `lo` down: nothing, not even 127.0.0.1, works until it is up."""
        ip("link", "set", "lo", "up", netns=self.name)

    def delete(self) -> None:
        """Stop our processes, then delete the namespace (its veth ends go with it)."""
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()
        if self.created:
            ip("netns", "delete", self.name, check=False)
            self.created = False

    def argv(
        self, argv: Sequence[str], uid: int | None = None, gid: int | None = None
    ) -> list[str]:
        """The command line that runs `argv` in this namespace, as `uid` if given."""
        prefix = ["ip", "netns", "exec", self.name]
        if uid is not None:
            prefix += setpriv_argv(uid, gid)
        return [*prefix, *argv]

    def exec(
        self,
        argv: Sequence[str],
        uid: int | None = None,
        gid: int | None = None,
        **popen: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside the namespace; it is stopped by pid when the namespace goes."""
        proc = subprocess.Popen(self.argv(argv, uid, gid), **popen)
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        uid: int | None = None,
        gid: int | None = None,
        timeout: float = 30.0,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion inside the namespace, text output captured."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            self.argv(argv, uid, gid), text=True, timeout=timeout, check=check, **kwargs
        )

    def stop(self, proc: subprocess.Popen[Any], grace: float = STOP_GRACE) -> None:
        """Stop one process started with `exec` (SIGKILL if it outlives `grace`)."""
        stop_process(proc, grace)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl (e.g. net.ipv4.ping_group_range) inside this namespace."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", 'printf "%s\\n" "$1" > "$2"', "sysctl", value, path], check=True)


Side = Literal["left", "right"]


@dataclass
class VethLink:
    """A veth pair between two namespaces, or a namespace and the host (`None`)."""

    left: NetNamespace | None
    right: NetNamespace | None
    left_name: str = field(default_factory=lambda: unique_name() + "a")
    right_name: str = field(default_factory=lambda: unique_name() + "b")
    created: bool = False

    def __enter__(self) -> VethLink:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def _ns(self, side: Side) -> str | None:
        ns = self.left if side == "left" else self.right
        return ns.name if ns is not None else None

    def _dev(self, side: Side) -> str:
        return self.left_name if side == "left" else self.right_name

    def create(self) -> None:
        """Create both ends directly in their namespaces (no host-side name clash) and up."""
        args = ["link", "add", "name", self.left_name]
        if self.left is not None:
            args += ["netns", self.left.name]
        args += ["type", "veth", "peer", "name", self.right_name]
        if self.right is not None:
            args += ["netns", self.right.name]
        ip(*args)
        self.created = True
        for side in ("left", "right"):
            ip("link", "set", self._dev(side), "up", netns=self._ns(side))

    def add_address(self, side: Side, cidr: str) -> None:
        """Add an address; IPv6 ones skip duplicate address detection so they work at once."""
        extra = ["nodad"] if ":" in cidr else []
        ip("addr", "add", cidr, "dev", self._dev(side), *extra, netns=self._ns(side))

    def add_route(self, side: Side, dest: str, via: str | None = None) -> None:
        """Route `dest` ("default" or a CIDR) out of this side's end, via a gateway if given."""
        fam = ["-6"] if ":" in (via or dest) else []
        argv = [*fam, "route", "add", dest]
        argv += ["via", via] if via else []
        ip(*argv, "dev", self._dev(side), netns=self._ns(side))

    def delete(self) -> None:
        """Delete the pair (one end takes the other with it); gone already is fine."""
        if not self.created:
            return
        for side in ("left", "right"):
            ns = self._ns(side)
            if ns is None or ns in namespaces():
                ip("link", "delete", self._dev(side), netns=ns, check=False)
                break
        self.created = False


def namespaces() -> set[str]:
    """Names of the namespaces `ip netns` knows."""
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


@dataclass(frozen=True)
class Addresses:
    """The documentation addresses a `Topology` uses."""

    pod4: str = "198.51.100.2"
    upstream4: str = "198.51.100.1"
    prefix4: int = 24
    hosts4: tuple[str, ...] = ("203.0.113.10", "203.0.113.11", "192.0.2.10")
    pod6: str = "2001:db8::2"
    upstream6: str = "2001:db8::1"
    prefix6: int = 64
    hosts6: tuple[str, ...] = ("2001:db8:1::10",)


class Topology:
    """A "pod" namespace (gateway + agent) wired to an "upstream" namespace of fake hosts.

    The pod's default routes (v4 and v6) go through the upstream end of the veth; the upstream
    side carries the extra host addresses, so a connection from the pod to 203.0.113.10 lands
    in the upstream namespace and nowhere else.
    """

    def __init__(self, addresses: Addresses | None = None) -> None:
        self.addr = addresses or Addresses()
        self.pod = NetNamespace()
        self.upstream = NetNamespace()
        self.link = VethLink(self.pod, self.upstream)

    def __enter__(self) -> Topology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def build(self) -> None:
        a = self.addr
        self.pod.create()
        self.upstream.create()
        self.link.create()
        self.link.add_address("left", f"{a.pod4}/{a.prefix4}")
        self.link.add_address("right", f"{a.upstream4}/{a.prefix4}")
        self.link.add_address("left", f"{a.pod6}/{a.prefix6}")
        self.link.add_address("right", f"{a.upstream6}/{a.prefix6}")
        for host in a.hosts4:
            self.link.add_address("right", f"{host}/32")
        for host in a.hosts6:
            self.link.add_address("right", f"{host}/128")
        self.link.add_route("left", "default", via=a.upstream4)
        self.link.add_route("left", "default", via=a.upstream6)

    def close(self) -> None:
        """Processes first, then the link, then both namespaces; each step runs regardless."""
        errors: list[BaseException] = []
        for step in (self.pod.delete, self.upstream.delete, self.link.delete):
            try:
                step()
            except Exception as e:  # keep cleaning up; report the first failure afterwards
                errors.append(e)
        if errors:
            raise errors[0]

    @contextlib.contextmanager
    def process(
        self, ns: NetNamespace, argv: Sequence[str], uid: int | None = None, **popen: Any
    ) -> Iterator[subprocess.Popen[Any]]:
        """A process that lives for the `with` block only."""
        proc = ns.exec(argv, uid=uid, **popen)
        try:
            yield proc
        finally:
            ns.stop(proc)


def can_use_netns() -> str | None:
    """None when namespaces can be made here, else why not (for skip/fail messages)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    try:
        probe = NetNamespace()
        with probe:
            pass
    except (OSError, NetnsError, subprocess.SubprocessError) as e:
        return f"ip netns unavailable: {e}"
    return None
