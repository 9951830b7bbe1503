"""The audit log: one JSON object per line, one line per request or refused connection.

Records are assembled by the data planes from request facts, which may hold anything the agent
sent; so every line goes through the redactor and query values are dropped before it is written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from gateway.credentials.redact import Redactor, global_redactor
from gateway.reasons import AnyReason, Reason

if TYPE_CHECKING:
    from gateway.policy.core import Decision, RequestFacts

QUERY_REDACTED = "REDACTED"
log = logging.getLogger("keyward.audit")


_SECOND: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def now_iso() -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z. The date and time of
    day are formatted once per second (a datetime per record was a tenth of its cost)."""
    global _SECOND
    t = time.time()
    second = int(t)
    cached = _SECOND
    if cached[0] != second:
        cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((t - second) * 1000):03d}Z"


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
    reason: AnyReason = Reason.ERROR  # build_record always names one
    injected: list[dict[str, str]] = dataclasses.field(default_factory=list)
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    alert: bool = False
    refusal: str | None = None  # how a refusal was answered: explain | reset
    policy: str = ""  # short hash of the config (policy) that decided, changes on reload
    addr: str | None = None  # the address connected to (or refused), when known

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive deep copy was most of the cost of a record.
        data = dict(self.__dict__)
        data["injected"] = [dict(i) for i in self.injected]
        return data


class Outcome(TypedDict, total=False):
    """How a request ended, as the plane that handled it saw it (all optional)."""

    status: int | None
    bytes_up: int
    bytes_down: int
    error: str | None
    reason: AnyReason | None  # overrides the decision's reason
    record_id: str | None
    addr: str | None  # the address connected to (or refused); default: the facts' addr


def build_record(
    facts: RequestFacts,
    decision: Decision | None,
    *,
    started: float,
    agent: str,
    policy: str,
    refusal: str | None = None,
    **outcome: Unpack[Outcome],
) -> AuditRecord:
    """The record of one request, refused connection or DNS query, from what the plane verified
    and what the policy decided (no decision = denied before the policy was asked)."""
    reason = outcome.get("reason")
    return AuditRecord(
        id=outcome.get("record_id") or new_id(),
        agent=agent,
        client=facts.client,
        plane=str(facts.plane),
        method=facts.method,
        scheme=facts.scheme,
        host=facts.host,
        port=facts.port,
        path=facts.path,
        decision=str(decision.verdict) if decision else "deny",
        rule=decision.rule if decision else None,
        reason=reason or (decision.reason if decision else Reason.ERROR),
        injected=[i.as_dict() for i in decision.injections] if decision else [],
        status=outcome.get("status"),
        bytes_up=outcome.get("bytes_up", 0),
        bytes_down=outcome.get("bytes_down", 0),
        duration_ms=round((time.monotonic() - started) * 1000, 3),
        error=outcome.get("error"),
        alert=bool(decision and decision.alert),
        refusal=refusal,
        policy=policy,
        addr=outcome.get("addr") or facts.addr,
    )


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


# One encoder for every line: `json.dumps` with options builds a new one per call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(data: dict[str, Any]) -> str:
    return _ENCODE(data)


def _withhold(data: dict[str, Any], redact: Callable[[str], str]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        text = json.dumps(value, ensure_ascii=False)
        out[key] = value if redact(text) == text else _WITHHELD
    return out


class AuditWriter:
    """Appends records as JSON lines to a file (created 0600) or stderr (`"-"`).

    Each record is one `write(2)` of a whole line on an O_APPEND descriptor, so lines from
    concurrent writers never interleave and a crash loses at most the record being written.

    Failing closed: a record that cannot be written (full disk, I/O error) is kept in a bounded
    in-memory backlog and the writer turns unhealthy. The data planes ask `available()` before
    forwarding anything: while unhealthy (and `on_error` is `refuse`) it answers False, so new
    requests are refused with 503 `audit-unavailable` and never reach an upstream. `available()`
    is also the probe: at most every PROBE_INTERVAL seconds it retries the backlog, and the
    writer is healthy again as soon as those records are on disk.

    Rotation is followed: at most every ROTATION_CHECK seconds (and at least every
    ROTATION_LINES records) the path is compared with the open file and reopened when it no
    longer names it. A record written in between to a file that was renamed is in that file; if
    the open file was unlinked, the records written since the last check are written again to
    the new file, so none is lost. SIGHUP and reload reopen at once (`reopen`).

    Free space (`available`): one fstatvfs is trusted for at most ROOM_INTERVAL seconds, and only
    while it showed more than ROOM_MARGIN bytes beyond HEADROOM and this writer has used less
    than that since; near HEADROOM every request checks again. Space taken by others in between
    is caught by the write itself: a failed write (ENOSPC) keeps the record and fails closed.
    """

    PROBE_INTERVAL = 0.25
    MAX_BACKLOG = 10_000
    HEADROOM = 64 * 1024  # bytes that must be free on the log's file system to forward
    ROTATION_CHECK = 0.1  # seconds between checks that the path still names the open file
    ROTATION_LINES = 1_000  # ... and records: what a rotation check may have to write again
    ROOM_INTERVAL = 0.25  # seconds one free-space check is trusted (when there is plenty)
    ROOM_MARGIN = 4 * 1024 * 1024  # "plenty": this much beyond HEADROOM

    def __init__(
        self,
        target: str | Path,
        redactor: Redactor | None = None,
        on_error: str = "refuse",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = str(target)
        self.redactor = redactor if redactor is not None else global_redactor()
        self.on_error = on_error
        self.clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        # Lines written since the path was last seen naming the open file, and when that was.
        self._unchecked: list[bytes] = []
        self._checked_at = 0.0
        # Until when (clock) and for how many more bytes the last free-space check holds.
        self._room_until = 0.0
        self._room_left = 0
        self._backlog: collections.deque[bytes] = collections.deque()
        self.lost = 0  # records dropped because the backlog was full
        self.write_errors = 0  # failed attempts to write (keyward_audit_errors_total)
        self.healthy = True
        self._next_probe = 0.0
        self.counts: dict[str, int] = {
            "allowed": 0,
            "denied": 0,
            "warned": 0,
            "injected": 0,
            "tls_rejected": 0,  # the agent refused the gateway's certificate: nothing was sent
        }
        if self.target != "-":
            self._open()

    # -- the file ------------------------------------------------------------------------
    def _open(self) -> int:
        if self._fd is None:
            path = Path(self.target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            st = os.fstat(fd)
            self._fd, self._ident = fd, (st.st_dev, st.st_ino)
            self._unchecked.clear()
            self._checked_at = self.clock()
            self._room_until = 0.0
        return self._fd

    def _close_fd(self) -> None:
        """Close the file. If it was unlinked, the lines written to it since the last rotation
        check go to the front of the backlog, to be written again to the file at the path."""
        if self._fd is not None:
            if self._unchecked:
                try:
                    unlinked = os.fstat(self._fd).st_nlink == 0
                except OSError:
                    unlinked = False
                if unlinked:
                    self._backlog.extendleft(reversed(self._unchecked))
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._ident = None
        self._unchecked.clear()
        self._room_until = 0.0

    def _rotated(self) -> bool:
        """True when the path no longer names the open file (renamed or unlinked)."""
        try:
            st = os.stat(self.target)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def _follow_rotation(self) -> None:
        """When a check is due: close the file if the path no longer names it (the next write
        opens the file at the path)."""
        if self._fd is None:
            return
        now = self.clock()
        if now - self._checked_at < self.ROTATION_CHECK and (
            len(self._unchecked) < self.ROTATION_LINES
        ):
            return
        if self._rotated():
            self._close_fd()
        else:
            self._checked_at = now
            self._unchecked.clear()

    def reopen(self) -> None:
        """Close and reopen the file (SIGHUP, reload, or after log rotation)."""
        with self._lock:
            self._close_fd()
            if self.target != "-":
                with contextlib.suppress(OSError):
                    self._open()
            if self._backlog and self.healthy:  # lines of an unlinked file, written again
                self._drain_backlog()

    def _write_line(self, data: bytes) -> None:
        """One write(2) of a whole line; raises OSError if the line is not entirely written."""
        if self.target == "-":
            sys.stderr.flush()
            view = memoryview(data)
            while view:  # a pipe may take it in pieces; nothing to undo on stderr
                view = view[os.write(2, view) :]
            return
        fd = self._open()
        n = os.write(fd, data)
        if n != len(data):
            # a short write on a nearly full disk: take the torn fragment back off the end
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.fstat(fd).st_size - n)
            raise OSError(errno.ENOSPC, "short write")
        self._unchecked.append(data)
        self._room_left -= n

    def _append(self, data: bytes) -> None:
        """Write the backlog then `data`, in order; on failure keep what is left for later."""
        self._follow_rotation()
        if self._backlog:
            self._backlog.append(data)
            if time.monotonic() >= self._next_probe:
                self._drain_backlog()
            else:
                self._trim_backlog()
            return
        try:
            self._write_line(data)
        except OSError as e:
            self._backlog.append(data)
            self._failed(e)

    def _drain_backlog(self) -> None:
        try:
            if self.lost:
                self._write_line(self._lost_line(self.lost))
                self.lost = 0
            while self._backlog:
                self._write_line(self._backlog[0])
                self._backlog.popleft()
        except OSError as e:
            self._trim_backlog()
            self._failed(e)
            return
        if not self.healthy:
            self.healthy = True
            log.error("audit log %s is writable again", self.target)

    def _trim_backlog(self) -> None:
        """Bounded memory: past MAX_BACKLOG the newest records are counted, not kept."""
        while len(self._backlog) > self.MAX_BACKLOG:
            self._backlog.pop()
            self.lost += 1

    def _failed(self, e: OSError) -> None:
        self.write_errors += 1
        self._close_fd()  # the next attempt reopens: the path may have been fixed or rotated
        self._next_probe = time.monotonic() + self.PROBE_INTERVAL
        if self.healthy:
            self.healthy = False
            what = "refusing new requests" if self.on_error == "refuse" else "continuing"
            log.error(
                "audit log %s cannot be written (%s); %s until it can",
                self.target,
                e.strerror or e,
                what,
            )

    def _lost_line(self, n: int) -> bytes:
        rec = AuditRecord(
            plane="audit",
            method="-",
            scheme="-",
            host="",
            port=0,
            path="",
            decision="deny",
            reason=Reason.AUDIT_RECORDS_LOST,
            error=f"{n} records could not be kept while the log was unwritable",
            alert=True,
        )
        return (_dumps(rec.as_dict()) + "\n").encode()

    def _room(self) -> bool:
        """Is there room for a request's record? A nearly full disk refuses before forwarding,
        rather than after, when the record would no longer fit. One fstatvfs, reused while
        there is plenty of room (see the class docstring)."""
        if self.target == "-" or self.HEADROOM <= 0:
            return True
        now = self.clock()
        if now < self._room_until and self._room_left > 0:
            return True
        try:
            st = os.fstatvfs(self._open())
        except OSError:
            return False
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        spare = free - self.HEADROOM - self.ROOM_MARGIN
        if spare > 0:
            self._room_until, self._room_left = now + self.ROOM_INTERVAL, spare
        else:
            self._room_until = 0.0
        return free >= self.HEADROOM

    def available(self) -> bool:
        """May a request be forwarded now? The pre-flight check of every data plane; while
        unhealthy it probes (retries the backlog) at most every PROBE_INTERVAL seconds."""
        if self.on_error == "continue":
            return True
        if self.healthy:
            if self._room():
                return True
            with self._lock:
                self._failed(OSError(errno.ENOSPC, "less than 64 KiB free"))
            return False
        now = time.monotonic()
        if now < self._next_probe:
            return False
        with self._lock:
            if not self.healthy:
                self._next_probe = now + self.PROBE_INTERVAL
                if self._room():
                    self._drain_backlog()
            return self.healthy

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
        data = (self.serialise(record) + "\n").encode()
        with self._lock:
            self._append(data)
            self._count(record)

    def _count(self, record: AuditRecord) -> None:
        if record.reason == Reason.CLIENT_TLS_REJECTED:
            self.counts["tls_rejected"] += 1
            return
        if record.decision == "deny":
            self.counts["denied"] += 1
            return
        self.counts["allowed"] += 1
        if record.decision == "warn":
            self.counts["warned"] += 1
        if record.injected:
            self.counts["injected"] += 1

    def close(self) -> None:
        """Close the file (one last try at the backlog); a later write reopens it."""
        with self._lock:
            if self._fd is not None and self._rotated():
                self._close_fd()  # lines of an unlinked file go to the backlog
            if self._backlog or self.lost:
                self._drain_backlog()
            self._close_fd()

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
