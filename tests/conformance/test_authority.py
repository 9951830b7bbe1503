"""A client authority (absolute-form URI, Host, :authority, SNI) naming anything but the
verified destination is refused with authority-mismatch; an agreeing one is rebuilt."""

from __future__ import annotations

import pytest

from tests.conformance.wire import Outcome, explicit, ids

__all__ = ["explicit"]


@pytest.mark.parametrize("attack", ids("authority"))
def test_explicit(explicit: Outcome, attack: str) -> None:
    explicit.check(attack)
