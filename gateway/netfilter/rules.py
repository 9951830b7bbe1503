"""The pod's netfilter rules, rendered as `iptables-restore --noflush` input (sans-IO).

Why these rules: the agent shares the gateway's network namespace, so the kernel is the only
place that can force every byte through the gateway, and it keeps doing so if the gateway dies.

IPv4, for every uid except the proxy uid:

- nat `KEYWARD-NAT`: traffic addressed to the namespace itself (loopback or the pod's own
  addresses) is left alone when it goes to a gateway listener or an `agent_ports_ok` port, and
  when it goes to the control port, so that the filter refuses it (the proxy must never be asked
  to connect there for the agent); UDP and TCP to port 53 anywhere go to the DNS listener; every
  other TCP connection, any address (loopback included), any port, goes to the transparent
  listener, which reads the real destination with `SO_ORIGINAL_DST`. REDIRECT rewrites only the
  first packet of a connection and the listener ports are exempt, so nothing loops; the proxy uid
  is exempt so its upstream connections are not redirected back to itself.
- filter `KEYWARD-OUT`: the proxy uid may send anything; replies on established flows to local
  addresses pass; other uids may open connections only to the listener ports (and
  `agent_ports_ok`) on local addresses; everything else is rejected at once (TCP reset, ICMP port
  unreachable for UDP, ICMP and the rest) so that a client fails fast instead of hanging.
  Raw ICMP needs CAP_NET_RAW, which agents lack; ICMP ping sockets (net.ipv4.ping_group_range)
  are caught by the final reject.

Local addresses are matched with `addrtype LOCAL`, not `-o lo`: after a REDIRECT the filter
chain still sees the output device of the original route.

IPv6 is not redirected: the gateway listens on 127.0.0.1 only. Other uids get nothing over IPv6
but established replies to local addresses and the `agent_ports_ok` ports; every other packet is
rejected (TCP reset, ICMPv6 port unreachable), so happy-eyeballs clients fall back to IPv4 at
once. The kernel's own neighbour discovery and MLD reports pass, or the proxy had no IPv6 either.

TCP packets of connections the proxy uid has sent on are marked (connmark) and accepted: a socket
the proxy closed no longer has an owner, and without the mark its last ACKs would be rejected.
The mark is honoured for TCP only: a UDP flow can be reused by another socket, a TCP one cannot.

Rules are written in the form `iptables -S` prints them, so `verify` compares text with text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Family = Literal[4, 6]

NAT_CHAIN = "KEYWARD-NAT"
FILTER_CHAIN = "KEYWARD-OUT"
# table -> our chain, jumped to from that table's OUTPUT chain.
CHAINS: dict[str, str] = {"nat": NAT_CHAIN, "filter": FILTER_CHAIN}
FAMILIES: tuple[Family, ...] = (4, 6)

# One connmark bit: connections the proxy uid has sent on. Conntrack is per namespace, so only
# rules inside the pod could clash; the bit is away from the ones kube-proxy uses.
PROXY_CONNMARK = 0x400000

DNS_PORT = 53


@dataclass(frozen=True)
class PodPorts:
    """Ports of the gateway listeners inside the pod's namespace, on loopback."""

    transparent: int = 8080  # mitmproxy transparent listener; every redirected TCP lands here
    explicit: int = 8081  # explicit (HTTP CONNECT) proxy listener; agents may use it
    dns: int = 8053  # gateway DNS listener (UDP and TCP)
    services: tuple[int, ...] = ()  # service-plane (base URL) ports agents may reach
    control: int = 8090  # health/readiness/metrics: never reachable from agent uids

    def __post_init__(self) -> None:
        listeners = self.listeners
        for port in (*listeners, self.control):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
        if self.control in listeners:
            raise ValueError(f"control port {self.control} is also an agent-reachable port")

    @property
    def listeners(self) -> tuple[int, ...]:
        """TCP ports agent uids may connect to on loopback, in a stable order."""
        ports = (self.transparent, self.explicit, self.dns, *self.services)
        return tuple(dict.fromkeys(ports))


@dataclass(frozen=True)
class Table:
    """One table of a rendered ruleset: our chain's rules and the jump into it."""

    name: str
    chain: str
    rules: tuple[str, ...]  # "-A CHAIN ..." lines, as `iptables -S CHAIN` prints them

    @property
    def jump(self) -> str:
        return f"-A OUTPUT -j {self.chain}"


# "Addressed to this namespace": loopback and the pod's own addresses.
LOCAL = "-m addrtype --dst-type LOCAL"


def _owner(uid: int) -> str:
    return f"-m owner --uid-owner {uid}"


def _dport(proto: str, port: int, *, local: bool = False) -> str:
    """A port match in the order `iptables -S` prints it."""
    where = f" {LOCAL}" if local else ""
    return f"-p {proto}{where} -m {proto} --dport {port}"


# Neighbour discovery (hop limit 255) and MLD reports (hop limit 1) are sent by the kernel with
# no owning socket; without them even the proxy has no IPv6. Unprivileged sockets cannot forge
# them: ICMPv6 ping sockets only send echo requests.
ICMP6_KERNEL = ((133, 255), (135, 255), (136, 255), (143, 1))


def _nat_rules(proxy_uid: int, ports: PodPorts, agent_ports_ok: tuple[int, ...]) -> list[str]:
    c = NAT_CHAIN
    rules = [f"-A {c} {_owner(proxy_uid)} -j RETURN"]
    for port in dict.fromkeys((*ports.listeners, *agent_ports_ok, ports.control)):
        rules.append(f"-A {c} {_dport('tcp', port, local=True)} -j RETURN")
    for port in dict.fromkeys((ports.dns, *agent_ports_ok, ports.control)):
        rules.append(f"-A {c} {_dport('udp', port, local=True)} -j RETURN")
    rules.append(f"-A {c} {_dport('udp', DNS_PORT)} -j REDIRECT --to-ports {ports.dns}")
    rules.append(f"-A {c} {_dport('tcp', DNS_PORT)} -j REDIRECT --to-ports {ports.dns}")
    rules.append(f"-A {c} -p tcp -j REDIRECT --to-ports {ports.transparent}")
    return rules


def _filter_rules(
    proxy_uid: int, ports: PodPorts, family: Family, agent_ports_ok: tuple[int, ...]
) -> list[str]:
    c = FILTER_CHAIN
    mark = f"0x{PROXY_CONNMARK:x}/0x{PROXY_CONNMARK:x}"
    unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    rules = [
        f"-A {c} -p tcp -m connmark --mark {mark} -j ACCEPT",
        f"-A {c} {_owner(proxy_uid)} -j CONNMARK --set-xmark {mark}",
        f"-A {c} {_owner(proxy_uid)} -j ACCEPT",
        f"-A {c} {LOCAL} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    if family == 6:
        rules += [
            f"-A {c} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq {hl} -j ACCEPT"
            for t, hl in ICMP6_KERNEL
        ]
    tcp = list(agent_ports_ok)
    udp = list(agent_ports_ok)
    if family == 4:
        tcp = [*ports.listeners, *tcp]
        udp = [ports.dns, *udp]
    rules += [f"-A {c} {_dport('tcp', p, local=True)} -j ACCEPT" for p in dict.fromkeys(tcp)]
    rules += [f"-A {c} {_dport('udp', p, local=True)} -j ACCEPT" for p in dict.fromkeys(udp)]
    rules.append(f"-A {c} -p tcp -j REJECT --reject-with tcp-reset")
    rules.append(f"-A {c} -j REJECT --reject-with {unreachable}")
    return rules


def tables(
    proxy_uid: int,
    ports: PodPorts,
    *,
    family: Family,
    agent_ports_ok: Iterable[int] = (),
) -> tuple[Table, ...]:
    """The structured form of `render`: what `apply` installs and `verify` compares."""
    if proxy_uid < 0:
        raise ValueError("proxy uid must be >= 0")
    if family not in FAMILIES:
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    extra = tuple(dict.fromkeys(int(p) for p in agent_ports_ok))
    if ports.control in extra:
        raise ValueError(f"control port {ports.control} cannot be an agent port")
    out = []
    if family == 4:
        out.append(Table("nat", NAT_CHAIN, tuple(_nat_rules(proxy_uid, ports, extra))))
    out.append(Table("filter", FILTER_CHAIN, tuple(_filter_rules(proxy_uid, ports, family, extra))))
    return tuple(out)


def to_restore(tabs: Iterable[Table], *, delete: Iterable[tuple[str, str]] = ()) -> str:
    """`iptables-restore --noflush` text: (re)create our chains, fill them, jump from OUTPUT.

    `delete` holds (table, rule) pairs of stale jumps to remove first, so that the result has
    exactly one jump; in a fresh namespace there are none and the text stands alone.
    """
    stale = list(delete)
    lines: list[str] = []
    for t in tabs:
        lines += [f"*{t.name}", f":{t.chain} - [0:0]"]
        lines += ["-D" + rule[2:] for table, rule in stale if table == t.name]
        lines += list(t.rules)
        lines += [f"-I OUTPUT 1 -j {t.chain}", "COMMIT"]
    return "\n".join(lines) + "\n"


def render(
    proxy_uid: int,
    ports: PodPorts,
    *,
    family: Family,
    agent_ports_ok: Iterable[int] = (),
) -> str:
    """The ruleset for one address family, for `iptables-restore --noflush` (or ip6tables-).

    `agent_ports_ok` are extra loopback ports agent uids may use directly, not through the
    gateway (for example a dev server the agent runs and tests itself).
    """
    return to_restore(tables(proxy_uid, ports, family=family, agent_ports_ok=agent_ports_ok))


def render_all(
    proxy_uid: int, ports: PodPorts, *, agent_ports_ok: Iterable[int] = ()
) -> dict[int, str]:
    """Both families, keyed 4 and 6: what a pod needs."""
    extra = tuple(agent_ports_ok)
    return {f: render(proxy_uid, ports, family=f, agent_ports_ok=extra) for f in FAMILIES}


def parse(text: str) -> tuple[Table, ...]:
    """Read back a ruleset made by `render`, so `apply`/`verify` can take rendered text."""
    out: list[Table] = []
    name: str | None = None
    chain: str | None = None
    rules: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chain, rules = line[1:], None, []
        elif line.startswith(":"):
            declared = line[1:].split()[0]
            if declared not in CHAINS.values():
                raise ValueError(f"not a keyward chain: {declared}")
            chain = declared
        elif line == "COMMIT":
            if name is None or chain is None or CHAINS.get(name) != chain:
                raise ValueError(f"table {name!r} does not declare its keyward chain")
            out.append(Table(name, chain, tuple(rules)))
            name, chain = None, None
        elif line.startswith("-A ") and chain is not None and line.split()[1] == chain:
            rules.append(" ".join(line.split()))
        elif line.startswith(("-I OUTPUT", "-D OUTPUT")):
            continue  # the jump; apply manages it
        else:
            raise ValueError(f"unexpected line in a keyward ruleset: {line}")
    if name is not None:
        raise ValueError(f"table {name} has no COMMIT")
    return tuple(out)
