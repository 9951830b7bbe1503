"""The response pipeline (decode, scrub, SSE events) and the request body swapper, sans-IO."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.credentials.redact import REPLACEMENT, Redactor
from gateway.errors import ScrubError, UnscrubbableEncoding
from gateway.planes import scrub
from gateway.planes.scrub import (
    MESSAGE_CUT,
    BodyScrubber,
    MessageScrubber,
    accept_encoding,
    parse_codings,
    response_headers,
    standard_reason,
    upstream_request_headers,
)
from gateway.policy.apply import BodySwapper
from gateway.policy.core import Decision, InjectionPlan, Placeholder, Verdict

KEY = "sk-test-PIPELINE-0123456789abcdefXYZ"


def run(body: BodyScrubber, data: bytes, step: int) -> bytes:
    out: list[bytes] = []
    for i in range(0, len(data), step):
        out += body.feed(data[i : i + step])
    out += body.finish()
    assert all(out)  # an empty piece would end a chunked body
    return b"".join(out)


ENCODE = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


@settings(max_examples=60, deadline=None)
@given(
    codings=st.lists(st.sampled_from(sorted(ENCODE)), min_size=0, max_size=3),
    step=st.integers(min_value=1, max_value=5000),
    pad=st.binary(max_size=300),
)
def test_decoded_and_scrubbed_whatever_the_codings_and_chunking(
    codings: list[str], step: int, pad: bytes
) -> None:
    r = Redactor([KEY])
    plain = pad + KEY.encode() + pad + KEY.encode().hex().encode() + pad
    data = plain
    for c in codings:
        data = ENCODE[c](data)
    assert run(BodyScrubber(r, codings, False), data, step) == r.redact_bytes(plain)


def test_unknown_or_too_many_codings_are_refused() -> None:
    assert parse_codings(["gzip, identity", "br"]) == ["gzip", "br"]
    for bad in (["compress"], ["gzip, xz"], ["gzip"] * 5):
        with pytest.raises(UnscrubbableEncoding):
            parse_codings(bad)


def test_output_comes_in_bounded_pieces_and_bombs_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Redactor([KEY])
    body = BodyScrubber(r, ["gzip"], False)
    bomb = gzip.compress(b"\0" * (40 << 20))
    biggest = max(
        len(p) for i in range(0, len(bomb), 65536) for p in body.feed(bomb[i : i + 65536])
    )
    assert biggest <= scrub.PIECE
    monkeypatch.setattr(scrub, "MAX_STEP_OUTPUT", 1 << 20)
    with pytest.raises(ScrubError) as e:
        run(BodyScrubber(r, ["zstd"], False), ENCODE["zstd"](b"\0" * (8 << 20)), 65536)
    assert e.value.reason == "decompression-limit"


def test_corrupt_body_is_an_error() -> None:
    with pytest.raises(ScrubError):
        run(BodyScrubber(Redactor([KEY]), ["gzip"], False), b"\x1f\x8b" + b"x" * 100, 7)


def sse(events: list[list[str]]) -> bytes:
    return b"".join(b"".join(f"data: {d}\n".encode() for d in ev) + b"\n" for ev in events)


@pytest.mark.parametrize("step", [1, 3, 17, 10_000])
def test_sse_key_split_over_lines_and_events(step: int) -> None:
    r = Redactor([KEY])
    a, b = KEY[:11], KEY[11:]
    stream = sse([[a, b], [a], [b + " tail"], ["fine"], [f'{{"d": "{KEY}"}}']])
    out = run(BodyScrubber(r, [], True), stream, step)
    assert KEY.encode() not in out.replace(b"data: ", b"").replace(b"\n", b"")
    assert out.count(b"\n\n") == 5  # every event still arrives
    assert b"data: fine\n" in out and REPLACEMENT.encode() in out


def test_sse_event_is_released_as_soon_as_it_is_complete() -> None:
    body = BodyScrubber(Redactor([KEY]), [], True)
    assert body.feed(b"data: hello\n") == []  # not complete yet
    assert body.feed(b"\n") == [b"data: hello\n\n"]
    assert body.feed(b"data: " + KEY[:9].encode() + b"\n\n") == []  # could be the key: waits
    assert body.feed(b"data: unrelated\n\n") == [
        b"data: " + KEY[:9].encode() + b"\n\n",
        b"data: unrelated\n\n",
    ]


def test_sse_event_over_the_bound_ends_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scrub, "SSE_EVENT_LIMIT", 1000)
    body = BodyScrubber(Redactor([KEY]), [], True)
    with pytest.raises(ScrubError) as e:
        body.feed(b"data: " + b"x" * 2000)
    assert e.value.reason == "sse-event-too-large"


@settings(max_examples=60, deadline=None)
@given(step=st.integers(min_value=1, max_value=400), pad=st.binary(max_size=150))
def test_declared_length_body_is_scrubbed_the_same_whole_or_chunked(step: int, pad: bytes) -> None:
    """With a declared length, a first chunk that is the whole body is scrubbed at once (no
    tail held back); any other chunking goes through the stream scrubber: same bytes out."""
    r = Redactor([KEY])
    plain = pad + KEY.encode() + pad + KEY.encode().hex().encode() + pad + KEY.encode()[:9]
    assert run(BodyScrubber(r, [], False, len(plain)), plain, step) == r.redact_bytes(plain)


def test_declared_length_body_longer_than_declared_is_cut() -> None:
    body = BodyScrubber(Redactor([KEY]), [], False, 4)
    assert body.feed(b"abcd") == [b"abcd"]
    with pytest.raises(ScrubError):
        body.feed(KEY.encode()[:5])


def test_headers_without_a_secret_pass_unchanged_and_with_one_scrubbed() -> None:
    r = Redactor([KEY])
    clean = [("Content-Type", "application/json"), ("X-Id", "abc")]
    assert response_headers(clean, r, decoded=False) == clean
    echoed = [*clean, ("X-Echo", f"Bearer {KEY}"), ("X-Hex", KEY.encode().hex())]
    out = response_headers(echoed, r, decoded=False)
    assert out == [*clean, ("X-Echo", f"Bearer {REPLACEMENT}"), ("X-Hex", REPLACEMENT)]


def test_headers_and_reason() -> None:
    r = Redactor([KEY])
    out = response_headers(
        [("ETag", '"abc"'), ("Content-Encoding", "gzip"), ("X-Echo", KEY), ("Digest", "x")],
        r,
        decoded=True,
    )
    assert out == [("ETag", 'W/"abc"'), ("X-Echo", REPLACEMENT)]
    assert standard_reason(200) == "OK" and standard_reason(599) == ""


def test_request_headers_by_credential() -> None:
    agent = [("Range", "bytes=0-4"), ("If-Range", "x"), ("Accept-Encoding", "gzip, compress;q=1")]
    assert upstream_request_headers(agent, credentialed=True) == [("Accept-Encoding", "identity")]
    assert upstream_request_headers(agent, credentialed=False) == [
        ("Range", "bytes=0-4"),
        ("If-Range", "x"),
        ("Accept-Encoding", "gzip"),
    ]
    assert accept_encoding(False, None) is None


FAKE = "sk-fake-PLACEHOLDER-000000000001"
OTHER = "sk-fake-OTHERHOLDER-000000000002"


def swapper(swap_in: frozenset[str]) -> tuple[BodySwapper, list[str]]:
    ph = Placeholder("K", "key", FAKE, swap_in)
    other = Placeholder("O", "other", OTHER)
    plan = InjectionPlan((), (), (ph,) if "body" in swap_in else ())
    seen: list[str] = []
    d = Decision(Verdict.ALLOW, "r", "rule", plan)
    return BodySwapper(d, (ph, other), lambda s: f"REAL-{s}", lambda p: seen.append(p.env)), seen


@settings(max_examples=100, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(st.sampled_from([FAKE, OTHER, FAKE[:7]]), st.text(max_size=8)), max_size=8
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_body_swap_across_chunk_boundaries(pieces: list[str], cuts: list[int]) -> None:
    body = "".join(pieces).encode()
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    s, seen = swapper(frozenset({"body"}))
    out = b"".join([s.feed(c) for c in chunks] + [s.flush()])
    assert out == body.replace(FAKE.encode(), b"REAL-key")
    assert seen == ["O"] * body.count(OTHER.encode())


def test_body_not_in_swap_in_passes_unchanged_and_alerts() -> None:
    s, seen = swapper(frozenset({"header"}))
    assert not s.swaps
    assert s.feed(b"x " + FAKE.encode()) + s.flush() == b"x " + FAKE.encode()
    assert seen == ["K"]


def _messages(parts: list[bytes]) -> list[bytes]:
    ws = MessageScrubber(Redactor([KEY]))
    return [ws.feed(p) for p in parts]


@pytest.mark.parametrize("cut", [1, 3, MESSAGE_CUT - 1, MESSAGE_CUT, 12, len(KEY) - 1])
def test_key_split_across_two_messages_is_redacted(cut: int) -> None:
    """Each message keeps its boundary; the agent gets at most MESSAGE_CUT - 1 bytes."""
    key = KEY.encode()
    first, second = _messages([b'{"a": "' + key[:cut], key[cut:] + b'"}'])
    assert second.startswith(REPLACEMENT.encode()) and second.endswith(b'"}')
    leaked = first.removeprefix(b'{"a": "').replace(REPLACEMENT.encode(), b"")
    assert len(leaked) < MESSAGE_CUT
    assert key not in first + second and key[cut:] not in second


@pytest.mark.parametrize("form", [KEY.encode().hex().encode(), KEY.encode("utf-16-le")])
def test_split_forms_and_three_messages(form: bytes) -> None:
    third = len(form) // 3
    parts = [b"x " + form[:third], form[third : 2 * third], form[2 * third :] + b" y"]
    out = _messages(parts)
    assert form not in b"".join(out)
    assert out[2].endswith(b" y") and out[0].startswith(b"x ")
    assert len(b"".join(out).replace(REPLACEMENT.encode(), b"")) < MESSAGE_CUT + 4


def test_messages_without_a_secret_pass_unchanged() -> None:
    ws = MessageScrubber(Redactor([KEY]))
    plain = b"nothing to see"
    assert ws.feed(plain) is plain
    msgs = [b"sk-", b"hello", b"sk-test-", b"world", KEY.encode()[:5]]
    out = [ws.feed(m) for m in msgs]
    assert out[:2] == msgs[:2] and out[3:] == msgs[3:]
    assert out[2] == REPLACEMENT.encode()  # a form's start of MESSAGE_CUT bytes is cut
    assert ws.feed(b"z" * 100) == b"z" * 100  # nothing carried past a message that ends it
