"""The rendered pod rules: what they say (pure) and that iptables accepts them (root)."""

from __future__ import annotations

import pytest

from gateway.cli.main import main
from gateway.netfilter.apply import _normalise
from gateway.netfilter.rules import (
    CHAINS,
    FILTER_CHAIN,
    NAT_CHAIN,
    PodPorts,
    parse,
    render,
    render_all,
    tables,
    to_restore,
)
from gateway.pod.netns import NetNamespace

UID = 10101
PORTS = PodPorts(services=(8701, 8702))


def rules_of(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_nat_exempts_proxy_first_and_redirects_every_other_tcp_last() -> None:
    nat = rules_of(render(UID, PORTS, family=4), NAT_CHAIN)
    assert nat[0] == f"-A {NAT_CHAIN} -m owner --uid-owner {UID} -j RETURN"
    assert nat[-1] == f"-A {NAT_CHAIN} -p tcp -j REDIRECT --to-ports 8080"
    # no port match on the catch-all: SO_ORIGINAL_DST must work for every destination port
    assert "--dport" not in nat[-1]


def test_dns_redirect_comes_before_the_catch_all_for_udp_and_tcp() -> None:
    nat = rules_of(render(UID, PodPorts(dns=5300), family=4), NAT_CHAIN)
    udp = nat.index(f"-A {NAT_CHAIN} -p udp -m udp --dport 53 -j REDIRECT --to-ports 5300")
    tcp = nat.index(f"-A {NAT_CHAIN} -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 5300")
    assert max(udp, tcp) < len(nat) - 1


def test_loopback_listeners_and_control_are_not_redirected() -> None:
    nat = rules_of(render(UID, PORTS, family=4), NAT_CHAIN)
    first_redirect = next(i for i, r in enumerate(nat) if "REDIRECT" in r)
    exempt = nat[1:first_redirect]
    for port in (8080, 8081, 8053, 8701, 8702, 8090):
        assert (
            f"-A {NAT_CHAIN} -p tcp -m addrtype --dst-type LOCAL -m tcp --dport {port} -j RETURN"
            in exempt
        )
    assert all(" -m addrtype --dst-type LOCAL " in r for r in exempt)


def test_filter_lets_agents_reach_only_listener_ports_on_loopback() -> None:
    out = rules_of(render(UID, PORTS, family=4), FILTER_CHAIN)
    accepts = [r for r in out if r.endswith("-j ACCEPT")]
    agent_accepts = [r for r in accepts if "--uid-owner" not in r and "connmark" not in r]
    assert all(" -m addrtype --dst-type LOCAL " in r for r in agent_accepts)
    ports = {int(r.split("--dport ")[1].split()[0]) for r in agent_accepts if "--dport" in r}
    assert ports == {8080, 8081, 8053, 8701, 8702}
    assert 8090 not in ports  # the control port
    assert out[-2] == f"-A {FILTER_CHAIN} -p tcp -j REJECT --reject-with tcp-reset"
    assert out[-1] == f"-A {FILTER_CHAIN} -j REJECT --reject-with icmp-port-unreachable"


def test_control_port_is_refused_even_when_moved() -> None:
    text = render(UID, PodPorts(control=9100), family=4)
    assert "--dport 9100 -j ACCEPT" not in text
    assert (
        f"-A {NAT_CHAIN} -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 9100 -j RETURN" in text
    )
    with pytest.raises(ValueError, match="control port"):
        PodPorts(services=(8090,))
    with pytest.raises(ValueError, match="control port"):
        render(UID, PodPorts(), family=4, agent_ports_ok=(8090,))


def test_connmark_shortcut_is_tcp_only() -> None:
    out = rules_of(render(UID, PORTS, family=4), FILTER_CHAIN)
    marked = [r for r in out if "connmark --mark" in r]
    assert marked and all(" -p tcp " in r for r in marked)
    setter = next(r for r in out if "CONNMARK" in r)
    assert f"--uid-owner {UID}" in setter


def test_ipv6_has_no_redirect_and_rejects_everything_for_agents() -> None:
    text = render(UID, PORTS, family=6)
    assert "*nat" not in text
    out = rules_of(text, FILTER_CHAIN)
    agent_accepts = [
        r
        for r in out
        if r.endswith("-j ACCEPT")
        and "--uid-owner" not in r
        and "connmark" not in r
        and "-p ipv6-icmp" not in r
    ]
    assert agent_accepts == [
        f"-A {FILTER_CHAIN} -m addrtype --dst-type LOCAL -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ]
    assert out[-1] == f"-A {FILTER_CHAIN} -j REJECT --reject-with icmp6-port-unreachable"
    assert "icmp-port-unreachable" not in text.replace("icmp6-port-unreachable", "")
    # the ICMPv6 exemptions are the kernel's neighbour discovery and MLD, not echo requests
    icmp6 = [r for r in out if "-p ipv6-icmp" in r]
    assert {int(r.split("--icmpv6-type ")[1].split()[0]) for r in icmp6} == {133, 135, 136, 143}


def test_agent_ports_ok_are_exempt_on_both_families() -> None:
    both = render_all(UID, PodPorts(), agent_ports_ok=(3000,))
    for text in both.values():
        assert (
            f"-A {FILTER_CHAIN} -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 3000 -j ACCEPT"
            in text
        )
    assert (
        f"-A {NAT_CHAIN} -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 3000 -j RETURN"
        in both[4]
    )


def test_render_all_parse_roundtrip_and_jumps() -> None:
    both = render_all(UID, PORTS)
    assert sorted(both) == [4, 6]
    for family, text in both.items():
        tabs = tables(UID, PORTS, family=family)  # type: ignore[arg-type]
        assert parse(text) == tabs
        assert to_restore(tabs) == text
        for t in tabs:
            assert f"-I OUTPUT 1 -j {t.chain}" in text
            assert CHAINS[t.name] == t.chain


def test_parse_refuses_foreign_chains() -> None:
    with pytest.raises(ValueError, match="not a keyward chain"):
        parse("*filter\n:DOCKER - [0:0]\nCOMMIT\n")
    with pytest.raises(ValueError, match="unexpected line"):
        parse("*filter\n:KEYWARD-OUT - [0:0]\n-A OUTPUT -j ACCEPT\nCOMMIT\n")


def test_rendering_is_deterministic_and_rejects_bad_input() -> None:
    assert render(UID, PORTS, family=4) == render(UID, PORTS, family=4)
    with pytest.raises(ValueError):
        render(-1, PORTS, family=4)
    with pytest.raises(ValueError):
        render(UID, PORTS, family=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PodPorts(transparent=70000)


def test_normalise_folds_iptables_spellings() -> None:
    assert _normalise("-A X -p tcp --dport 1 -j ACCEPT") == "-A X -p tcp -m tcp --dport 1 -j ACCEPT"
    assert _normalise("-A X  -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT") == (
        "-A X -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )
    assert _normalise("-A X -p tcp -m tcp --dport 1 -j ACCEPT") == (
        "-A X -p tcp -m tcp --dport 1 -j ACCEPT"
    )


def test_cli_render(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["netfilter", "render", "--proxy-uid", "4242", "--family", "4"]
    assert main([*argv, "--service-port", "8701", "--dns-port", "5353"]) == 0
    out = capsys.readouterr().out
    assert out == render(4242, PodPorts(dns=5353, services=(8701,)), family=4)
    assert main(["netfilter", "render", "--proxy-uid", "4242"]) == 0
    out = capsys.readouterr().out
    assert "# iptables-restore --noflush" in out and "icmp6-port-unreachable" in out
    assert main(["netfilter", "render", "--control-port", "8080"]) == 2


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_iptables_restore_accepts_the_rules(family: int) -> None:
    tool = "iptables-restore" if family == 4 else "ip6tables-restore"
    text = render(UID, PORTS, family=family, agent_ports_ok=(3000,))  # type: ignore[arg-type]
    with NetNamespace() as ns:
        ok = ns.run([tool, "--test", "--noflush"], input=text)
        assert ok.returncode == 0, ok.stderr
        broken = text.replace("--to-ports", "--to-portz").replace("tcp-reset", "tcp-resat")
        bad = ns.run([tool, "--test", "--noflush"], input=broken)
        assert bad.returncode != 0
        # --test changed nothing
        listing = ns.run([tool.replace("-restore", "-save")])
        assert "KEYWARD" not in listing.stdout
