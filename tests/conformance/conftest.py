"""The conformance suite: attacks actually attempted against keyward, one test per attack.

Each test is an attack a hostile agent (or a hostile upstream) could try, run against the real
gateway: both data planes (mitm, services) and both modes (explicit proxy under `keyward run`,
transparent in a pod) where the class applies. A test passes when the attack fails.

Run alone with `scripts/conformance` (or `pytest tests/conformance`); `scripts/test` runs it too.
It prints one `PASS`/`FAIL` line per attack, then a tally line. Tests that need root fail instead
of skipping when CI=true, like the rest of the suite.
"""

from __future__ import annotations

import pytest

_PREFIX = "tests/conformance/"
_results: dict[str, str] = {}


def _is_conformance(nodeid: str) -> bool:
    return nodeid.startswith(_PREFIX) or nodeid.startswith("conformance/")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _is_conformance(report.nodeid):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            _results[report.nodeid] = "PASS"
        elif report.skipped:
            _results[report.nodeid] = "SKIP"
        else:
            _results[report.nodeid] = "FAIL"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _results:
        return
    tr = terminalreporter
    tr.section("keyward conformance")
    for nodeid, outcome in _results.items():
        tr.write_line(f"{outcome} {nodeid.removeprefix(_PREFIX)}")
    counts = {k: sum(1 for v in _results.values() if v == k) for k in ("PASS", "FAIL", "SKIP")}
    tr.write_line(
        f"conformance: {counts['PASS']} attacks refused, {counts['FAIL']} got through,"
        f" {counts['SKIP']} not run"
    )
