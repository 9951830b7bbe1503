"""The audit log: one JSON object per line, one line per request or refused connection.

Records are assembled by the data planes from request facts, which may hold anything the agent
sent; so every line goes through the redactor and query values are dropped before it is written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gateway.credentials.redact import Redactor, global_redactor

QUERY_REDACTED = "REDACTED"


def now_iso() -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    """A short unique id that sorts by time: 12 hex digits of milliseconds + 8 random."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


@dataclasses.dataclass(kw_only=True)
class AuditRecord:
    """DESIGN §5. `alert` marks records a human should look at (placeholder on a wrong host)."""

    ts: str = dataclasses.field(default_factory=now_iso)
    id: str = dataclasses.field(default_factory=new_id)
    agent: str = ""
    client: str = ""
    plane: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    decision: str
    rule: str | None = None
    reason: str = ""
    injected: list[dict[str, str]] = dataclasses.field(default_factory=list)
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    alert: bool = False
    refusal: str | None = None  # how a refusal was answered: explain | reset

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive deep copy was most of the cost of a record.
        data = dict(self.__dict__)
        data["injected"] = [dict(i) for i in self.injected]
        return data


def redact_query(path: str) -> str:
    """Keep the query's keys, replace every value with REDACTED, drop any fragment.

    A parameter without `=` may itself be a token, so it is replaced whole.
    """
    path = path.split("#", 1)[0]
    base, sep, query = path.partition("?")
    if not sep:
        return base
    parts = []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if eq:
            parts.append(f"{key}={QUERY_REDACTED}" if value else f"{key}=")
        elif item:
            parts.append(QUERY_REDACTED)
        else:
            parts.append("")
    return f"{base}?{'&'.join(parts)}"


def _redact_tree(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redact_tree(v, redact) for v in value]
    if isinstance(value, dict):
        return {k: _redact_tree(v, redact) for k, v in value.items()}
    return value


_WITHHELD = "[REDACTED]"
_KEEP = frozenset({"ts", "id", "decision", "port", "status", "bytes_up", "bytes_down"})


def _withheld(text: str) -> str:
    return _WITHHELD


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _withhold(data: dict[str, Any], redact: Callable[[str], str]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        text = json.dumps(value, ensure_ascii=False)
        out[key] = value if redact(text) == text else _WITHHELD
    return out


class AuditWriter:
    """Appends records as JSON lines to a file (created 0600) or stderr (`"-"`).

    Thread-safe and flushed per record, so a crash loses at most the record being written. A
    synchronous write is cheap enough to call from the event loop.
    """

    def __init__(self, target: str | Path, redactor: Redactor | None = None) -> None:
        self.target = str(target)
        self.redactor = redactor if redactor is not None else global_redactor()
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self.counts: dict[str, int] = {"allowed": 0, "denied": 0, "warned": 0, "injected": 0}
        if self.target != "-":
            self._open()

    def _open(self) -> IO[str]:
        if self._file is None:
            path = Path(self.target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        return self._file

    def serialise(self, record: AuditRecord) -> str:
        """The redacted JSON line for `record` (without newline)."""
        data = record.as_dict()
        data["path"] = redact_query(str(data.get("path") or ""))
        redact = self.redactor.redact
        line = _dumps(data)
        # Fast path, one regex pass: with no backslash in the line nothing was escaped, so a
        # value (or any registered form of it) inside a field appears verbatim in the line.
        if "\\" not in line and redact(line) == line:
            return line
        clean = _redact_tree(data, redact)
        line = _dumps(clean)
        # A second pass over the whole line catches escaped forms split across the JSON text.
        again = redact(line)
        if again != line:
            try:
                intact = list(json.loads(again)) == list(clean)
            except ValueError:
                intact = False
            if intact:
                line = again
            else:  # a form spanned JSON syntax: withhold what it touches
                line = _dumps(_withhold(clean, redact))
                if redact(line) != line:
                    line = _dumps(
                        {
                            k: v if k in _KEEP else _redact_tree(v, _withheld)
                            for k, v in clean.items()
                        }
                    )
        return line

    def write(self, record: AuditRecord) -> None:
        line = self.serialise(record) + "\n"
        with self._lock:
            if self.target == "-":
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                f = self._open()
                f.write(line)
                f.flush()
            self._count(record)

    def _count(self, record: AuditRecord) -> None:
        if record.decision == "deny":
            self.counts["denied"] += 1
            return
        self.counts["allowed"] += 1
        if record.decision == "warn":
            self.counts["warned"] += 1
        if record.injected:
            self.counts["injected"] += 1

    def close(self) -> None:
        """Close the file; a later write reopens it, so no late record is lost."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
