"""The Docker FORWARD DROP check `up` runs for Podman internal networks (iptables text in)."""

from __future__ import annotations

from gateway.pair.hostnet import forward_drop_problem

DOCKER_FORWARD = "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n"
EMPTY_USER = "-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n"


def test_drop_policy_with_bridge_netfilter_is_a_problem_with_the_fix() -> None:
    p = forward_drop_problem(DOCKER_FORWARD, EMPTY_USER, "1\n", "mynet", "10.89.3.0/24")
    assert p is not None
    assert "mynet (10.89.3.0/24)" in p
    assert "iptables -I DOCKER-USER -s 10.89.3.0/24 -d 10.89.3.0/24 -j ACCEPT" in p


def test_no_problem_without_drop_or_bridge_netfilter_or_with_an_accept() -> None:
    assert forward_drop_problem("-P FORWARD ACCEPT\n", EMPTY_USER, "1", "n", "10.0.0.0/24") is None
    assert forward_drop_problem(DOCKER_FORWARD, EMPTY_USER, "0", "n", "10.0.0.0/24") is None
    assert forward_drop_problem(DOCKER_FORWARD, EMPTY_USER, None, "n", "10.0.0.0/24") is None
    accept = "-A DOCKER-USER -s 10.0.0.0/16 -d 10.0.0.0/16 -j ACCEPT\n" + EMPTY_USER
    assert forward_drop_problem(DOCKER_FORWARD, accept, "1", "n", "10.0.3.0/24") is None
    other = "-A DOCKER-USER -s 10.9.0.0/24 -d 10.9.0.0/24 -j ACCEPT\n" + EMPTY_USER
    assert forward_drop_problem(DOCKER_FORWARD, other, "1", "n", "10.0.3.0/24") is not None
