"""Reading the audit log back: records, follow mode, and per-host summaries."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


def parse_lines(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line while the writer is mid-record
        if isinstance(rec, dict):
            yield rec


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        yield from parse_lines(iter(f))


def follow(f: TextIO, poll: float = 0.25, stop: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield records as they are appended (like `tail -f`); `stop` bounds the wait in seconds."""
    deadline = None if stop is None else time.monotonic() + stop
    buf = ""
    while deadline is None or time.monotonic() < deadline:
        chunk = f.readline()
        if not chunk:
            time.sleep(poll)
            continue
        buf += chunk
        if buf.endswith("\n"):
            yield from parse_lines(iter([buf]))
            buf = ""


def summarise(records: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per host: requests by decision, credentials injected, bytes, alerts."""
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"decisions": Counter(), "injected": 0, "bytes_up": 0, "bytes_down": 0, "alerts": 0}
    )
    for r in records:
        host = str(r.get("host") or "?")
        row = rows[host]
        row["decisions"][str(r.get("decision"))] += 1
        row["injected"] += 1 if r.get("injected") else 0
        row["bytes_up"] += int(r.get("bytes_up") or 0)
        row["bytes_down"] += int(r.get("bytes_down") or 0)
        row["alerts"] += 1 if r.get("alert") else 0
    out = []
    for host, row in sorted(rows.items(), key=lambda kv: -sum(kv[1]["decisions"].values())):
        d = row.pop("decisions")
        out.append({"host": host, "allow": d["allow"], "warn": d["warn"], "deny": d["deny"], **row})
    return out
