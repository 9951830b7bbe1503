"""Everything keyward keeps about one flow, in one typed object: what the addons hand each
other between hooks (the facts decided on, the decision, byte counts, timers). One place to
read what a flow carries, instead of string keys in `flow.metadata` spread over four addons."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mitmproxy import http

from gateway.planes.scrub import MessageScrubber
from gateway.policy.apply import BodySwapper
from gateway.policy.core import Decision, RequestFacts
from gateway.reasons import AnyReason

KEY = "keyward"


@dataclass(slots=True)
class FlowState:
    started: float = 0.0
    facts: RequestFacts | None = None  # set once the request is decided (or refused)
    decision: Decision | None = None
    policy: str | None = None  # the hash of the policy that decided
    audited: bool = False  # its one audit record is written
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    reason: AnyReason | None = None  # why a response was refused or cut while scrubbing
    body: BodySwapper | None = None  # placeholders swapped in the request body
    deferred: bool = False  # decided again once the (bounded) form body is in
    redecided: bool = False  # ... and that second decision has been made
    ws_scrub: MessageScrubber | None = None  # the upstream's WebSocket messages
    timer: asyncio.TimerHandle | None = None  # the response timeout armed now
    deadline: float = 0.0  # loop time it expires at (the timer may fire earlier: it re-arms)
    timed_out: bool = False


def state(flow: http.HTTPFlow) -> FlowState:
    """The flow's state, created on first use."""
    st = flow.metadata.get(KEY)
    if st is None:
        st = flow.metadata[KEY] = FlowState()
    assert isinstance(st, FlowState)
    return st


@dataclass(slots=True)
class ConnState:
    """Everything keyward keeps about one client connection, dropped when it disconnects."""

    target: tuple[str, int] | None = None  # the CONNECT target or the original destination
    tunnelled: bool = False  # came through an explicit CONNECT
    approved: set[tuple[str, int]] = field(default_factory=set)  # dials a decision allowed
    # dial address -> the verified (name, port) it was approved for
    names: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    # dial address -> the checked address to connect to instead
    checked: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    refused: bool = False  # a dial was refused and audited by server_connect
    explained: bool = False  # a denied CONNECT completed to explain the refusal
