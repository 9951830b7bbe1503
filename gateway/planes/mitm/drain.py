"""Drain on stop: the mitm plane stops listening, lets live requests and streams finish up to
the drain bound, then cuts what is left, each with an audit record (`gateway-stopping`)."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http


class Drain:
    """Tracks every flow between its request headers and its end."""

    def __init__(self, cut: Callable[[http.HTTPFlow], None]) -> None:
        self.flows: set[http.HTTPFlow] = set()
        self.cut = cut  # audits a flow cut by the stop

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.flows.add(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self.flows.discard(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.flows.discard(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.flows.discard(flow)

    def cut_all(self) -> int:
        """Audit every flow still live (the plane is about to close them); how many."""
        left = list(self.flows)
        self.flows.clear()
        for flow in left:
            self.cut(flow)
        return len(left)
