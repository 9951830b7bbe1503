"""Request limits (414/431) and control bytes in header fields (400): refused before
anything is sent upstream."""

from __future__ import annotations

import pytest

from tests.conformance.wire import Outcome, explicit, ids, pod, pod_ids

__all__ = ["explicit", "pod"]

# the explicit and pod outcomes run every wire attack once per module: minutes of set-up
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("attack", ids("limits"))
def test_explicit(explicit: Outcome, attack: str) -> None:
    explicit.check(attack)


@pytest.mark.root
@pytest.mark.parametrize("attack", pod_ids("limits"))
def test_pod(pod: Outcome, attack: str) -> None:
    pod.check(attack)
