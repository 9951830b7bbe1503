"""The audit writer: valid JSON lines under concurrency, and no secret in any of them."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.writer import AuditRecord, AuditWriter, new_id, now_iso, redact_query
from gateway.credentials.redact import Redactor, derived_forms

SECRET = "sk-audit-SECRET-value-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
FIELDS = [
    "ts",
    "id",
    "agent",
    "client",
    "plane",
    "method",
    "scheme",
    "host",
    "port",
    "path",
    "decision",
    "rule",
    "reason",
    "injected",
    "status",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "error",
    "alert",
    "refusal",
    "policy",
    "addr",
]


def record(**kw: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "agent": "agent",
        "client": "127.0.0.1:5000",
        "plane": "mitm",
        "method": "GET",
        "scheme": "https",
        "host": "api.example.test",
        "port": 443,
        "path": "/v1/models",
        "decision": "allow",
        "rule": "api.example.test",
        "reason": "rule",
    }
    base.update(kw)
    return AuditRecord(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_has_exactly_the_documented_fields() -> None:
    rec = record()
    assert [f.name for f in dataclasses.fields(rec)] == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec.ts)


def test_new_id_is_short_unique_and_time_ordered() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(re.fullmatch(r"[0-9a-f]{20}", i) for i in ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/models", "/v1/models"),
        ("/a?key=sekrit&b=2", "/a?key=REDACTED&b=REDACTED"),
        ("/a?key=&x", "/a?key=&REDACTED"),
        ("/a?token#frag=secret", "/a?REDACTED"),
        ("/a#frag", "/a"),
        ("/a?", "/a?"),
        ("/a?x=1&&y=a=b", "/a?x=REDACTED&&y=REDACTED"),
        ("http://h/p?api_key=zzz", "http://h/p?api_key=REDACTED"),
    ],
)
def test_redact_query(path: str, expected: str) -> None:
    assert redact_query(path) == expected


def test_file_is_created_0600_appended_and_flushed_per_record(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    w = AuditWriter(path, Redactor())
    w.write(record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(lines(path)) == 1  # readable before close: flushed
    w.close()
    w2 = AuditWriter(str(path), Redactor())
    w2.write(record(decision="deny", reason="no-rule", rule=None))
    w2.close()
    w2.write(record())  # a late record after close is not lost
    w2.close()
    got = lines(path)
    assert [r["decision"] for r in got] == ["allow", "deny", "allow"]
    assert list(got[0]) == FIELDS
    assert got[1]["rule"] is None and got[0]["alert"] is False


def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(path, Redactor([SECRET]))
    b64 = base64.b64encode(f"user:{SECRET}".encode()).decode()
    w.write(
        record(
            path=f"/x/{SECRET}/y?api_key={SECRET}&q=plain#{SECRET}",
            reason=f"upstream echoed {SECRET}",
            error=f'failed: {{"auth": "Basic {b64}", "k": {json.dumps(SECRET)}}}',
            client=SECRET,
            injected=[{"secret": "openai", "location": f"header:{SECRET}"}],
            alert=True,
        )
    )
    w.close()
    text = path.read_text()
    assert SECRET not in text
    assert base64.b64encode(SECRET.encode()).decode()[8:30] not in text
    rec = lines(path)[0]
    assert rec["path"] == "/x/[REDACTED]/y?api_key=REDACTED&q=REDACTED"
    assert rec["reason"] == "upstream echoed [REDACTED]"
    assert rec["client"] == "[REDACTED]" and rec["alert"] is True
    assert rec["injected"] == [{"secret": "openai", "location": "header:[REDACTED]"}]


@pytest.mark.parametrize("secret", ["sk-plain-0123456789abcdef", 'pa"ss/w\\ord-ü-0123456789'])
def test_no_form_of_a_secret_survives_in_any_field(tmp_path: Path, secret: str) -> None:
    """Every registered form (raw, base64, percent, JSON-escaped) in every text field, read
    back decoded: none survives, including escaped forms the JSON line escapes again."""
    forms = derived_forms(secret)
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(path, Redactor([secret]))
    text_fields = ["agent", "client", "method", "host", "path", "rule", "reason", "error"]
    for name in text_fields:
        for form in sorted(forms):
            w.write(record(**{name: f"/pre {form} post"}))
    w.close()
    got = lines(path)
    assert len(got) == len(text_fields) * len(forms)
    for rec in got:
        decoded = json.dumps(rec, ensure_ascii=False)
        values = " ".join(str(v) for v in rec.values())
        assert not [f for f in forms if f in values or f in decoded], rec


@pytest.mark.parametrize(
    "value",
    ['AAAAAA","client":"BBBBBB', 'AAAAAA","cli', 'x","reason":"zz'],
    ids=["spans-two-fields", "breaks-json", "quotes"],
)
def test_value_spanning_json_syntax_is_withheld_and_lines_stay_valid(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(path, Redactor([value]))
    w.write(record(agent="AAAAAA", client="BBBBBB", error=value))
    w.write(record(reason=value))
    w.close()
    text = path.read_text()
    assert value not in text and json.dumps(value)[1:-1] not in text
    got = lines(path)
    assert len(got) == 2 and all(list(r) == FIELDS for r in got)
    assert all(isinstance(r["alert"], bool) and isinstance(r["port"], int) for r in got)
    assert got[0]["error"] == "[REDACTED]" and got[1]["reason"] == "[REDACTED]"


def test_concurrent_writers_produce_exactly_n_valid_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(path, Redactor([SECRET]))
    threads, per_thread = 16, 250

    def work(n: int) -> None:
        for i in range(per_thread):
            w.write(
                record(
                    path=f"/t{n}/{i}?token={SECRET}",
                    reason=("x" * 5000) + SECRET,
                    decision="deny" if i % 5 == 0 else "allow",
                    injected=[{"secret": "k", "location": "header:A"}] if i % 2 else [],
                )
            )

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    w.close()
    got = lines(path)
    assert len(got) == threads * per_thread
    assert len({r["id"] for r in got}) == len(got)
    assert {(r["path"].split("/")[1], r["path"].split("/")[2].split("?")[0]) for r in got} == {
        (f"t{n}", str(i)) for n in range(threads) for i in range(per_thread)
    }
    assert SECRET not in path.read_text()
    assert w.counts["denied"] == threads * 50
    assert w.counts["allowed"] == threads * 200
    # odd i carry injections; the odd multiples of 5 among them were denied and do not count
    assert w.counts["injected"] == threads * 100
    assert sum(1 for r in got if r["injected"] and r["decision"] == "allow") == w.counts["injected"]


def test_warn_counts_as_allowed(tmp_path: Path) -> None:
    w = AuditWriter(tmp_path / "a.jsonl", Redactor())
    for decision in ("warn", "allow", "deny"):
        w.write(record(decision=decision, injected=[{"secret": "k", "location": "basic"}]))
    # an agent that refused the gateway's certificate sent nothing: neither allowed nor denied
    w.write(record(decision="allow", reason="client-tls-rejected"))
    w.close()
    assert w.counts == {"allowed": 2, "denied": 1, "warned": 1, "injected": 2, "tls_rejected": 1}


def test_dash_writes_to_stderr() -> None:
    code = (
        "from gateway.audit.writer import AuditWriter, AuditRecord;"
        "from gateway.credentials.redact import Redactor;"
        f"w = AuditWriter('-', Redactor([{SECRET!r}]));"
        "w.write(AuditRecord(plane='http', method='GET', scheme='http', host='h', port=80,"
        f" path='/?a=1', decision='allow', error={SECRET!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout == ""
    rec = json.loads(proc.stderr)
    assert rec["error"] == "[REDACTED]" and rec["path"] == "/?a=REDACTED"


# -- failing closed, rotation ----------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size`: writes to it fail with ENOSPC once it is full (root only)."""
    from tests.conftest import require_root

    require_root()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, "64k") as mnt:
        yield mnt


def fill(path: Path) -> None:
    """Fill the file system holding `path` until it refuses another byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"x" * size) == size:
                    pass
    finally:
        os.close(fd)


@pytest.mark.root
def test_full_disk_keeps_every_record_whole_and_recovers(tiny_fs: Path) -> None:
    """Writes that hit ENOSPC leave no torn line; the records are kept and written, in order,
    once there is room again; meanwhile the writer says it is unavailable."""
    path = tiny_fs / "audit.jsonl"
    w = AuditWriter(path, Redactor())
    w.HEADROOM = 0  # exercise the write-failure path itself, not the pre-flight free-space check
    w.PROBE_INTERVAL = 0.0
    w.write(record(path="/before"))
    fill(tiny_fs / "filler")
    for i in range(20):
        w.write(record(path=f"/during/{i}"))
    assert not w.available() and not w.healthy
    text = path.read_text()
    assert all(json.loads(line) for line in text.splitlines())  # no torn line
    assert text.endswith("\n")
    (tiny_fs / "filler").unlink()
    assert w.available() and w.healthy
    w.write(record(path="/after"))
    w.close()
    paths = [r["path"] for r in lines(path)]
    assert paths == ["/before", *[f"/during/{i}" for i in range(20)], "/after"]


@pytest.mark.root
def test_nearly_full_disk_is_unavailable_before_a_write_fails(tiny_fs: Path) -> None:
    path = tiny_fs / "audit.jsonl"
    w = AuditWriter(path, Redactor())
    w.PROBE_INTERVAL = 0.0
    assert w.available()
    fill(tiny_fs / "filler")
    assert not w.available()
    (tiny_fs / "filler").unlink()
    assert w.available()


def test_on_error_continue_keeps_serving(tmp_path: Path) -> None:
    w = AuditWriter(tmp_path / "a.jsonl", Redactor(), on_error="continue")
    w._failed(OSError(28, "No space left on device"))
    assert not w.healthy and w.available()


class Clock:
    """A monotonic clock the test moves by hand: the writer's rate-limited checks become due
    when the test says so, not when a busy machine gets round to it."""

    def __init__(self) -> None:
        self.now = time.monotonic()  # where a writer that started on the real clock left off

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_backlog_is_bounded_and_the_gap_recorded(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    clock = Clock()
    w = AuditWriter(path, Redactor(), clock=clock)
    w.MAX_BACKLOG, w.PROBE_INTERVAL = 5, 0.0
    path.unlink()
    path.mkdir()  # the path now names a directory: every write fails
    clock.advance(1.0)  # the next record checks the path
    for i in range(8):
        w.write(record(path=f"/{i}"))
    assert len(w._backlog) == 5 and w.lost == 3
    path.rmdir()
    assert w.available()
    out = lines(path)
    assert out[0]["reason"] == "audit-records-lost" and "3 records" in out[0]["error"]
    assert [r["path"] for r in out[1:]] == [f"/{i}" for i in range(5)]


def test_timestamps_are_utc_iso_with_milliseconds() -> None:
    for _ in range(3):
        before = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
        ts = now_iso()
        after = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
        assert before <= dt.datetime.fromisoformat(ts[:-1]) <= after


@pytest.mark.parametrize("how", ["rename", "unlink"])
def test_rotation_is_followed(tmp_path: Path, how: str) -> None:
    path = tmp_path / "a.jsonl"
    clock = Clock()
    w = AuditWriter(path, Redactor(), clock=clock)
    w.write(record(path="/old"))
    clock.advance(1.0)
    w.write(record(path="/old-checked"))  # the check passes: the path names the open file
    if how == "rename":
        path.rename(tmp_path / "a.jsonl.1")
        assert [r["path"] for r in lines(tmp_path / "a.jsonl.1")] == ["/old", "/old-checked"]
    else:
        path.unlink()
    clock.advance(1.0)
    w.write(record(path="/new"))
    # an unlinked file's lines since the last check are written again (nobody can read them)
    again = ["/old-checked"] if how == "unlink" else []
    assert [r["path"] for r in lines(path)] == [*again, "/new"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotation_check_is_rate_limited_and_loses_nothing(tmp_path: Path) -> None:
    """Within ROTATION_CHECK of the last check, records go to the open file: after a rename
    they are in the renamed file; after an unlink they are written again to the new file once
    the check runs, so every record is readable exactly once."""
    path, old = tmp_path / "a.jsonl", tmp_path / "a.jsonl.1"
    clock = Clock()
    w = AuditWriter(path, Redactor(), clock=clock)
    w.write(record(path="/1"))
    path.rename(old)
    w.write(record(path="/2"))  # no check due yet: into the renamed file
    clock.advance(1.0)
    w.write(record(path="/3"))
    assert [r["path"] for r in lines(old)] == ["/1", "/2"]
    assert [r["path"] for r in lines(path)] == ["/3"]
    clock.advance(1.0)
    w.write(record(path="/4"))  # checked: /3 and /4 are on a file at the path
    path.unlink()
    w.write(record(path="/5"))  # into the unlinked file...
    w.write(record(path="/6"))
    clock.advance(1.0)
    w.write(record(path="/7"))  # ...and written again here, before this one
    assert [r["path"] for r in lines(path)] == ["/4", "/5", "/6", "/7"]
    clock.advance(1.0)
    w.write(record(path="/8"))  # checked: only /8 is written since
    path.unlink()
    w.write(record(path="/9"))
    w.reopen()  # SIGHUP / reload: at once, and the unlinked file's lines are not lost
    w.write(record(path="/10"))
    w.close()
    assert [r["path"] for r in lines(path)] == ["/8", "/9", "/10"]


def test_rotation_check_runs_at_least_every_rotation_lines_records(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    w = AuditWriter(path, Redactor(), clock=Clock())  # the clock never moves
    w.ROTATION_LINES = 3
    w.write(record(path="/1"))
    path.unlink()
    for i in range(2, 6):
        w.write(record(path=f"/{i}"))
    # the third record since the open checked: /1../3 written again, then /4, /5
    assert [r["path"] for r in lines(path)] == ["/1", "/2", "/3", "/4", "/5"]


def test_free_space_check_is_reused_only_while_there_is_plenty(tmp_path: Path) -> None:
    """One fstatvfs holds for ROOM_INTERVAL while more than ROOM_MARGIN is spare; a nearly
    full file system is checked on every request (test above)."""
    path = tmp_path / "a.jsonl"
    clock = Clock()
    w = AuditWriter(path, Redactor(), clock=clock)
    calls: list[int] = []
    real = os.fstatvfs

    def spy(fd: int) -> os.statvfs_result:
        calls.append(fd)
        return real(fd)

    os.fstatvfs = spy  # type: ignore[assignment]
    try:
        w.ROOM_MARGIN = 1  # any real file system has more than that spare
        assert w.available() and w.available()
        assert len(calls) == 1
        clock.advance(1.0)
        assert w.available()
        assert len(calls) == 2
        w._room_left = 0  # as if this writer had written all the spare room since
        assert w.available()
        assert len(calls) == 3
        w.ROOM_MARGIN = 1 << 62  # never plenty: every request checks
        clock.advance(1.0)
        assert w.available() and w.available()
        assert len(calls) == 5
    finally:
        os.fstatvfs = real  # type: ignore[assignment]


def test_reopen_switches_to_the_file_now_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    w = AuditWriter(path, Redactor())
    w.write(record(path="/1"))
    w.reopen()
    w.write(record(path="/2"))
    assert [r["path"] for r in lines(path)] == ["/1", "/2"]


def test_each_record_is_one_write_of_a_whole_line(tmp_path: Path) -> None:
    """strace-free check: the writer's file descriptor is raw (no buffered text layer whose
    flush could split a line over several write calls)."""
    path = tmp_path / "a.jsonl"
    w = AuditWriter(path, Redactor())
    calls: list[bytes] = []
    real = os.write

    def spy(fd: int, data: bytes) -> int:
        calls.append(bytes(data))
        return real(fd, data)

    os.write = spy  # type: ignore[assignment]
    try:
        w.write(record(path="/" + "a" * 20000))
    finally:
        os.write = real  # type: ignore[assignment]
    assert len(calls) == 1 and calls[0].endswith(b"\n") and calls[0].count(b"\n") == 1
