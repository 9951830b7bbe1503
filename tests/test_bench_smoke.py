"""The benchmark script runs end to end at its smallest size and writes every documented key.
No timing assertions: the figures of a tiny run mean nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANES = ("direct", "service", "mitm", "mitmdump")
PLANE_KEYS = ("rps_c1", "rps_c16", "rps_c64", "p50_ms", "p99_ms", "p50_ms_c64", "p99_ms_c64")
SUMMARY_KEYS = (
    "service_vs_direct",
    "service_vs_mitmdump",
    "mitm_vs_mitmdump",
    "mitm_vs_mitmdump_c1",
    "mitm_vs_mitmdump_c16",
)
SSE_KEYS = ("delay_p50_ms", "delay_p99_ms", "ttfe_ms")
BODY_KEYS = ("down_mb_s", "up_mb_s")
GATEWAY_BODY_KEYS = ("down_peak_rss_mb", "up_peak_rss_mb")
RULES_KEYS = ("rps_10", "rps_10000", "ratio", "start_s_10", "start_s_10000")
STARTUP_KEYS = ("median_s", "min_s", "max_s", "runs")


def positive(section: dict[str, object], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        value = section.get(key)
        assert isinstance(value, (int, float)), f"{where}.{key} = {value!r}"
        assert value > 0, f"{where}.{key} = {value!r}"


def finite(section: dict[str, object], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        value = section.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{where}.{key}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and pins cores")
@pytest.mark.skipif(shutil.which("curl") is None, reason="the start-up figure runs curl")
@pytest.mark.slow
def test_bench_tiny_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--tiny",
            "--json",
            str(out),
            "--compare",
            str(ROOT),  # this checkout against itself: the before/after path runs
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())

    for plane in PLANES:
        positive(data[plane], (*PLANE_KEYS, "ratio_vs_direct"), plane)
        finite(data[plane], ("added_p50_ms",), plane)
        for c in ("c1", "c16", "c64"):
            spread = data[plane]["spread"][c]
            assert len(spread) == 3 and 0 < spread[0] <= spread[1] <= spread[2], (plane, c)
    positive(data["summary"], SUMMARY_KEYS, "summary")

    sse = data["sse"]
    positive(sse, ("events", "interval_ms"), "sse")
    for plane in PLANES:
        positive(sse[plane], SSE_KEYS, f"sse.{plane}")
        if plane != "direct":
            finite(sse[plane], ("added_p50_ms", "added_p99_ms"), f"sse.{plane}")

    body = data["bigbody"]
    positive(body, ("bytes", "gateway_base_rss_mb"), "bigbody")
    for plane in ("direct", "service", "mitm"):
        positive(body[plane], BODY_KEYS, f"bigbody.{plane}")
    for plane in ("service", "mitm"):
        positive(body[plane], GATEWAY_BODY_KEYS, f"bigbody.{plane}")

    positive(data["rules"], RULES_KEYS, "rules")
    positive(data["startup"], STARTUP_KEYS, "startup")
    positive(data["meta"], ("cpus", "seconds"), "meta")
    assert data["meta"]["mode"] == "tiny"
    cmp = data["compare"]
    assert Path(cmp["tree"]) == ROOT.resolve()
    for plane in ("service", "mitm"):
        for key in ("rps_c1", "rps_c64", "p50_ms", "down_mb_s"):
            positive(cmp[plane][key], ("before", "after", "ratio"), f"compare.{plane}.{key}")
        assert all(v >= 0 for v in cmp[plane]["down_cpu_s_per_gib"].values())
    positive(cmp["startup_s"], ("before", "after", "ratio"), "compare.startup_s")
    if data["wrk"] is not None:
        for plane in ("direct", "service"):
            positive(data["wrk"][plane], ("rps_c1", "rps_c16", "rps_c64"), f"wrk.{plane}")
