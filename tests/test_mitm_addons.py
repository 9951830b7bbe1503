"""The mitm addons driven directly with mitmproxy's own test flows (`tflow`) and options
(`taddons`): no proxy, no sockets. Here: how a transparent flow is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from gateway.config.loader import load_config
from gateway.planes.mitm.addons import Destinations
from gateway.planes.transparent import make_verifier
from gateway.runtime.assemble import build_context

CONFIG = """\
version: 1
egress:
  default: deny
  hosts:
    "plain.example.test": {}
upstream:
  resolve:
    "plain.example.test:8443": "127.0.0.1:8443"
audit:
  path: "-"
"""
ANSWERS = {"127.0.0.1": {"dns.example.test"}}


@pytest.fixture
def dest(tmp_path: Path) -> Destinations:
    (tmp_path / "keyward.yaml").write_text(CONFIG)
    ctx = build_context(load_config(tmp_path / "keyward.yaml"), tmp_path / "state", environ={})
    return Destinations(ctx, make_verifier(lambda ip: ANSWERS.get(ip, set()), ctx.connect_target))


def transparent_flow(host_header: str | None, sni: str | None = None) -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse("transparent")
    flow.client_conn.sni = sni
    flow.request.host, flow.request.port = "127.0.0.1", 8443  # the original destination
    if host_header is not None:
        flow.request.headers["Host"] = host_header
    return flow


@pytest.mark.parametrize(
    ("host_header", "sni", "name"),
    [
        ("plain.example.test:8443", None, "plain.example.test"),  # upstream.resolve
        ("dns.example.test", None, "dns.example.test"),  # the gateway's DNS answer
        ("evil.example.test", None, "127.0.0.1"),  # unproven: decided as the bare IP
        ("evil.example.test", "dns.example.test", "dns.example.test"),  # SNI first
        ("dns.example.test", "evil.example.test", "127.0.0.1"),
    ],
)
def test_a_transparent_flow_is_decided_under_a_name_only_the_verifier_proved(
    dest: Destinations, host_header: str, sni: str | None, name: str
) -> None:
    with taddons.context(dest):
        flow = transparent_flow(host_header, sni)
        assert dest.verified(flow) == (name, 8443, "127.0.0.1")


def test_the_original_destination_is_kept_across_a_resolve_rewrite(dest: Destinations) -> None:
    """The first request fixes the connection's destination: a later rewrite of the request's
    address (`upstream.resolve`) does not change what the next request is verified against."""
    with taddons.context(dest):
        flow = transparent_flow("plain.example.test:8443")
        assert dest.verified(flow)[0] == "plain.example.test"
        flow.request.data.host = "10.9.9.9"  # what route() does when a resolve target differs
        assert dest.verified(flow) == ("plain.example.test", 8443, "127.0.0.1")


def test_an_explicit_proxy_flow_is_decided_on_its_own_request_target(dest: Destinations) -> None:
    with taddons.context(dest):
        flow = tflow.tflow()  # regular mode, absolute-form plain HTTP
        assert dest.verified(flow) == (flow.request.host, flow.request.port, None)
