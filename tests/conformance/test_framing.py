"""Request framing: smuggling forms are refused or decided as one request, pipelined and
keep-alive requests are decided one by one, and HTTP/2 bodies never cross into HTTP/1.1 unframed."""

from __future__ import annotations

import pytest

from tests.conformance.wire import Outcome, explicit, ids, pod, pod_ids

__all__ = ["explicit", "pod"]

# the explicit and pod outcomes run every wire attack once per module: minutes of set-up
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("attack", ids("framing"))
def test_explicit(explicit: Outcome, attack: str) -> None:
    explicit.check(attack)


@pytest.mark.root
@pytest.mark.parametrize("attack", pod_ids("framing"))
def test_pod(pod: Outcome, attack: str) -> None:
    pod.check(attack)
