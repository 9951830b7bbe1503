"""The redactor and stream scrubber: every encoded form of a known value is removed."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.credentials.redact import (
    REPLACEMENT,
    REPLACEMENT_BYTES,
    RedactingFilter,
    Redactor,
    StreamScrubber,
    global_redactor,
    install_logging_filter,
)

SECRET = "sk-test-Zq8/+w==Secret_value-0123456789"
OTHER = "ghp_abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture
def r() -> Redactor:
    return Redactor([SECRET, OTHER])


def test_raw_value_is_replaced(r: Redactor) -> None:
    assert r.redact(f"key={SECRET}; other {OTHER}.") == f"key={REPLACEMENT}; other {REPLACEMENT}."


@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda b: base64.b64encode(b).rstrip(b"="),
        lambda b: base64.urlsafe_b64encode(b).rstrip(b"="),
    ],
    ids=["std", "urlsafe", "std-nopad", "urlsafe-nopad"],
)
def test_base64_forms(r: Redactor, encode: object) -> None:
    text = encode(SECRET.encode()).decode()  # type: ignore[operator]
    out = r.redact(f"x {text} y")
    assert out == f"x {REPLACEMENT} y"


@pytest.mark.parametrize("user", ["", "u", "us", "x-access-token", "abcde"])
@pytest.mark.parametrize("tail", ["", "!", "!!", "!!!"])
@pytest.mark.parametrize("urlsafe", [False, True])
def test_value_inside_longer_base64_at_any_alignment(
    r: Redactor, user: str, tail: str, urlsafe: bool
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    blob = encode(f"{user}:{SECRET}{tail}".encode()).decode()
    out = r.redact(f"Authorization: Basic {blob}")
    assert REPLACEMENT in out
    # the characters that encode only the secret's bytes are gone
    lead = len(user) + 1
    middle = blob[-(-8 * lead // 6) : (8 * (lead + len(SECRET))) // 6]
    assert len(middle) > 40 and middle not in out


def test_basic_auth_header_as_built_by_apply_plan(r: Redactor) -> None:
    header = "Basic " + base64.b64encode(f"x-access-token:{OTHER}".encode()).decode()
    out = r.redact(header)
    assert out != header and REPLACEMENT in out
    assert base64.b64encode(OTHER.encode()).decode()[4:20] not in out


@pytest.mark.parametrize("encode", [lambda v: quote(v, safe=""), quote, quote_plus])
def test_percent_encoded(r: Redactor, encode: object) -> None:
    enc = encode(SECRET)  # type: ignore[operator]
    assert enc != SECRET
    assert r.redact(f"/cb?token={enc}&x=1") == f"/cb?token={REPLACEMENT}&x=1"


def test_percent_encoded_lowercase_hex(r: Redactor) -> None:
    enc = quote(SECRET, safe="").replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d")
    assert r.redact(enc) == REPLACEMENT


def test_json_escaped_values() -> None:
    tricky = 'pa"ss\\w/ord\u00e9\u2603-12345'
    r = Redactor([tricky])
    for text in (
        json.dumps({"v": tricky}),
        json.dumps({"v": tricky}, ensure_ascii=False),
        json.dumps({"v": tricky}).replace("/", "\\/"),
    ):
        out = r.redact(text)
        assert json.loads(out) == {"v": REPLACEMENT}


def escape_some(value: str, mask: int, upper: bool = False) -> str:
    """`value` with the characters picked by `mask` written as JSON `\\uXXXX` escapes."""
    out = []
    for i, ch in enumerate(value):
        if mask >> (i % 30) & 1:
            esc = "".join(f"\\u{ord(u):04x}" for u in ch.encode("utf-16-be").decode("utf-16-be"))
            out.append(esc.upper().replace("\\U", "\\u") if upper else esc)
        else:
            out.append(ch)
    return "".join(out)


@pytest.mark.parametrize("form", ["hex", "HEX", "utf-16-le", "utf-16-be"])
def test_hex_and_utf16_forms(r: Redactor, form: str) -> None:
    raw = SECRET.encode()
    data = {
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "utf-16-le": SECRET.encode("utf-16-le"),
        "utf-16-be": SECRET.encode("utf-16-be"),
    }[form]
    out = r.redact_bytes(b"dump: " + data + b" end")
    assert data not in out and REPLACEMENT_BYTES in out
    if form.startswith("utf-16"):
        assert SECRET not in out.replace(b"\0", b"").decode("latin-1")
        codec = form
        assert SECRET not in (b"\0" + out + b"\0").decode(codec, "replace")
        assert SECRET not in out.decode(codec, "replace")


@pytest.mark.parametrize("mask", [0b1, 0b10, 0b101010, (1 << 30) - 1, 0x2AAAAAAA, 0x15555555])
@pytest.mark.parametrize("upper", [False, True])
def test_any_mix_of_json_escapes_and_literals(r: Redactor, mask: int, upper: bool) -> None:
    text = escape_some(SECRET, mask, upper)
    body = json.dumps({"a": 1})[:-1] + f', "k": "{text}"}}'
    assert json.loads(body)["k"] == SECRET  # what the agent would decode
    out = r.redact(body)
    assert SECRET not in json.loads(out)["k"]
    assert r.redact_bytes(body.encode()) == out.encode()


def test_short_values_are_ignored() -> None:
    r = Redactor(["abc", "12345"])
    assert len(r) == 0 and r.max_len == 0
    assert r.redact("abc 12345") == "abc 12345"


def test_longest_value_wins_when_one_contains_another() -> None:
    r = Redactor(["secret-abcdef", "secret-abcdef-longer-part"])
    assert r.redact("x secret-abcdef-longer-part y") == f"x {REPLACEMENT} y"


def test_redact_bytes_matches_redact(r: Redactor) -> None:
    text = f"{SECRET} and {base64.b64encode(OTHER.encode()).decode()} \u00e9"
    assert r.redact_bytes(text.encode()) == r.redact(text).encode()


@pytest.mark.slow
def test_add_is_thread_safe_while_redacting() -> None:
    r = Redactor()
    values = [f"value-{i:04d}-padding" for i in range(60)]
    errors: list[BaseException] = []

    def adder(chunk: list[str]) -> None:
        for v in chunk:
            r.add(v)

    def reader() -> None:
        try:
            for _ in range(200):
                r.redact(" ".join(values))
        except BaseException as e:  # pragma: no cover - the assertion reports it
            errors.append(e)

    threads = [threading.Thread(target=adder, args=(values[i::4],)) for i in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(r) == 60
    assert r.redact(" ".join(values)) == " ".join([REPLACEMENT] * 60)


# -- stream scrubber ---------------------------------------------------------------------


def stream(r: Redactor, chunks: list[bytes]) -> bytes:
    s = StreamScrubber(r)
    return b"".join([s.feed(c) for c in chunks] + [s.flush()])


def test_stream_passes_chunks_through_untouched_when_nothing_can_match(r: Redactor) -> None:
    s = StreamScrubber(r)
    chunk = b'data: {"delta": "hello world"}\n\n'
    assert s.feed(chunk) is chunk
    assert s.flush() == b""


def test_stream_with_empty_redactor_is_identity() -> None:
    s = StreamScrubber(Redactor())
    chunk = b"anything at all"
    assert s.feed(chunk) is chunk


def test_stream_holds_a_possible_prefix_then_redacts_across_the_boundary(r: Redactor) -> None:
    s = StreamScrubber(r)
    first = s.feed(b"event: " + SECRET[:10].encode())
    assert first == b"event: "  # the possible start of the secret is held back
    second = s.feed(SECRET[10:].encode() + b" done\n")
    assert second == REPLACEMENT.encode() + b" done\n"
    assert s.flush() == b""


def test_stream_releases_a_false_start_on_flush(r: Redactor) -> None:
    s = StreamScrubber(r)
    out = s.feed(b"partial " + SECRET[:12].encode())
    assert out + s.flush() == b"partial " + SECRET[:12].encode()


def test_stream_never_holds_more_than_longest_form(r: Redactor) -> None:
    s = StreamScrubber(r)
    total = 0
    fed = 0
    for _ in range(50):
        chunk = SECRET[:-1].encode()  # keeps looking like the start of the secret
        fed += len(chunk)
        total += len(s.feed(chunk))
        assert fed - total <= r.max_len - 1


FORMS = [
    SECRET,
    OTHER,
    SECRET.encode().hex(),
    OTHER.encode().hex().upper(),
    SECRET.encode("utf-16-le").decode("latin-1"),
    OTHER.encode("utf-16-be").decode("latin-1"),
    escape_some(SECRET, 0b1011),
    escape_some(OTHER, (1 << 30) - 1, upper=True),
    base64.b64encode(SECRET.encode()).decode(),
    base64.b64encode(b"user:" + OTHER.encode()).decode(),
    quote_plus(SECRET),
    json.dumps(SECRET)[1:-1],
]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(FORMS),
            st.text(max_size=12),
            st.sampled_from(FORMS).map(lambda f: f[: len(f) // 2]),
            st.sampled_from(["\\", "\\u00", "\\u0073", "\0", "7"]),
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_chunking_gives_the_whole_body_result(pieces: list[str], cuts: list[int]) -> None:
    r = Redactor([SECRET, OTHER])
    body = "".join(pieces).encode("latin-1", "backslashreplace")
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert stream(r, chunks) == r.redact_bytes(body)


@settings(max_examples=200, deadline=None)
@given(
    value=st.text(min_size=6, max_size=40).filter(lambda v: len(v) >= 6),
    prefix=st.binary(max_size=5),
    suffix=st.binary(max_size=5),
)
def test_value_is_found_inside_any_base64(value: str, prefix: bytes, suffix: bytes) -> None:
    r = Redactor([value])
    blob = base64.b64encode(prefix + value.encode() + suffix).decode()
    assert REPLACEMENT in r.redact(blob)


# -- logging -----------------------------------------------------------------------------


def test_logging_filter_redacts_message_args_and_exceptions() -> None:
    r = Redactor([SECRET])
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactingFilter(r))
    logger = logging.getLogger("keyward.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("token %s rejected", SECRET)
        logger.warning(f"inline {SECRET}")
        try:
            raise ValueError(f"upstream said {SECRET}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = buf.getvalue()
    assert SECRET not in out
    assert "token [REDACTED] rejected" in out
    assert "inline [REDACTED]" in out
    assert "ValueError: upstream said [REDACTED]" in out


def test_install_logging_filter_uses_global_redactor_and_is_idempotent() -> None:
    value = "global-secret-for-logging-test-1234"
    global_redactor().add(value)
    root = logging.getLogger()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root.addHandler(handler)
    try:
        install_logging_filter()
        install_logging_filter()
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logging.getLogger("keyward.child").warning("leak? %s", value)
    finally:
        root.removeHandler(handler)
        for target in (root, logging.getLogger("keyward")):
            for f in list(target.filters):
                if isinstance(f, RedactingFilter):
                    target.removeFilter(f)
    assert value not in buf.getvalue()
    assert "leak? [REDACTED]" in buf.getvalue()


def _unfiltered(r: Redactor, data: bytes) -> bytes:
    """Every pass's regex over the whole body, with none of the shortcuts that skip a pass."""
    for p in r._state.passes:
        data = p.bytes_re.sub(REPLACEMENT_BYTES, data)
    return data


BYTE_FORMS = [
    SECRET.encode("utf-16-le"),
    OTHER.encode("utf-16-be"),
    SECRET.encode().hex().encode(),
    escape_some(OTHER, 0b10110).encode(),
    SECRET.encode(),
    b"\\u00e9\\n\\/",
    bytes(300),
    bytes(5000),
]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(BYTE_FORMS),
            st.binary(max_size=40),
            st.sampled_from(BYTE_FORMS).map(lambda f: f[: len(f) // 2]),
        ),
        max_size=10,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=12000), max_size=6),
)
def test_shortcuts_never_skip_a_match(pieces: list[bytes], cuts: list[int]) -> None:
    """The fast checks that skip a pass (no anchor form present, no escape of a value's
    character, only near a backslash) give what the full regex passes give, streamed or not,
    zero-heavy bodies included."""
    r = Redactor([SECRET, OTHER])
    body = b"".join(pieces)
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    want = _unfiltered(r, body)
    assert r.redact_bytes(body) == want
    assert stream(r, chunks) == want


def test_registering_many_values_compiles_the_patterns_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store of n secrets must not rebuild n times (each build compiles every value's forms:
    25 secrets added one by one took 13 s on a busy machine)."""
    from gateway.credentials import redact
    from gateway.credentials.secret import SecretValue
    from gateway.credentials.store import SecretStore

    builds: list[int] = []
    real_build = redact._build

    def counting(values: frozenset[str]) -> redact._State:
        builds.append(len(values))
        return real_build(values)

    monkeypatch.setattr(redact, "_build", counting)
    values = {f"s{i}": SecretValue(f"sk-value-{i:04d}-abcdefghijkl") for i in range(25)}
    store = SecretStore(values, redactor=redact.Redactor())
    assert len(store.redactor) == 25
    assert len([n for n in builds if n]) == 2  # the store's redactor and the process-wide one
    assert store.redactor.redact("x sk-value-0007-abcdefghijkl y") == "x [REDACTED] y"
