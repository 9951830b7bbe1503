"""A client authority (absolute-form URI, Host, :authority, SNI) naming anything but the
verified destination is refused with authority-mismatch; an agreeing one is rebuilt."""

from __future__ import annotations

import pytest

from tests.conformance.wire import Outcome, explicit, ids, pod, pod_ids

__all__ = ["explicit", "pod"]

# the explicit and pod outcomes run every wire attack once per module: minutes of set-up
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("attack", ids("authority"))
def test_explicit(explicit: Outcome, attack: str) -> None:
    explicit.check(attack)


@pytest.mark.root
@pytest.mark.parametrize("attack", pod_ids("authority"))
def test_pod(pod: Outcome, attack: str) -> None:
    pod.check(attack)
