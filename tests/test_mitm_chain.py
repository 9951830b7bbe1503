"""keyward's addons behind one mitmproxy addon: the same calls, order and error handling as
mitmproxy's own chain, on a real mitmproxy AddonManager."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpResponseHook
from mitmproxy.test import taddons, tflow

from gateway.planes.mitm.chain import AddonChain


class Recorder:
    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag

    def requestheaders(self, flow: object) -> None:
        self.calls.append(f"{self.tag}.requestheaders")


class AsyncRecorder(Recorder):
    async def requestheaders(self, flow: object) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.tag}.requestheaders")

    def response(self, flow: object) -> None:
        self.calls.append(f"{self.tag}.response")


class Failing:
    def requestheaders(self, flow: object) -> None:
        raise RuntimeError("boom")


class Halting:
    def response(self, flow: object) -> None:
        raise exceptions.AddonHalt()


async def test_hooks_run_in_order_errors_are_logged_and_halt_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    chain = AddonChain(
        [
            Recorder(calls, "a"),
            Failing(),
            AsyncRecorder(calls, "b"),
            Halting(),
            Recorder(calls, "c"),
        ]
    )
    assert not hasattr(chain, "server_connect")  # no addon has it: mitmproxy skips the chain
    assert chain.get("failing") is chain.chain[1] and chain.get("nothing") is None
    with taddons.context(chain) as tctx:
        flow = tflow.tflow(resp=True)
        with caplog.at_level(logging.ERROR):
            await tctx.master.addons.handle_lifecycle(server_hooks.ServerConnectHook(None))
            await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
            await tctx.master.addons.handle_lifecycle(HttpResponseHook(flow))
    # the failing addon's error is logged as mitmproxy logs it, and the next addon still runs;
    # AddonHalt ends the chain: c never sees the response
    assert calls == ["a.requestheaders", "b.requestheaders", "c.requestheaders", "b.response"]
    assert any("Addon error: boom" in r.getMessage() for r in caplog.records)
