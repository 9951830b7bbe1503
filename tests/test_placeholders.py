"""Placeholders: stable, provider-shaped fakes that never carry the real value."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.credentials.placeholders import FORMATS, detect_format, load_seed, make_placeholder
from gateway.credentials.secret import SecretValue
from gateway.errors import PlaceholderError

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))

SHAPES = {
    "sk-proj": r"sk-proj-[A-Za-z0-9_-]{74}T3BlbkFJ[A-Za-z0-9_-]{74}",
    "sk-ant": r"sk-ant-api03-[A-Za-z0-9_-]{86}-[A-Za-z0-9_-]{6}AA",
    "sk": r"sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
    "ghp": r"ghp_[A-Za-z0-9]{36}",
    "github_pat": r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}",
    "xoxb": r"xoxb-[1-9][0-9]{11}-[1-9][0-9]{12}-[A-Za-z0-9]{24}",
    "akia": r"AKIA[A-Z2-7]{16}",
    "jwt": r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}",
    "generic": r"[A-Za-z0-9]{40}",
}
LENGTHS = {"sk-proj": 164, "sk-ant": 108, "ghp": 40, "github_pat": 93, "akia": 20, "sk": 51}


def b64url_json(part: str) -> object:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# -- seed --------------------------------------------------------------------------------


def test_seed_created_once_0600_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    seed = load_seed(state)
    path = state / "placeholder.seed"
    assert len(seed) == 32 and path.read_bytes() == seed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_seed(state) == seed
    assert load_seed(tmp_path / "other") != seed


def test_seed_with_loose_mode_is_tightened(tmp_path: Path) -> None:
    seed = load_seed(tmp_path)
    (tmp_path / "placeholder.seed").chmod(0o644)
    assert load_seed(tmp_path) == seed
    assert stat.S_IMODE((tmp_path / "placeholder.seed").stat().st_mode) == 0o600


def test_corrupt_seed_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "placeholder.seed").write_bytes(b"short")
    with pytest.raises(PlaceholderError, match=r"placeholder\.seed should hold 32 bytes, found 5"):
        load_seed(tmp_path)


# -- formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fmt"),
    [
        ("sk-proj-" + "a" * 150, "sk-proj"),
        ("sk-ant-api03-" + "b" * 90 + "AA", "sk-ant"),
        ("sk-" + "c" * 48, "sk"),
        ("ghp_" + "d" * 36, "ghp"),
        ("github_pat_11" + "E" * 20 + "_" + "f" * 59, "github_pat"),
        ("xoxb-1234-5678-abcdef", "xoxb"),
        ("AKIAIOSFODNN7EXAMPLE", "akia"),
        ("AKIAlowercase-not-aws", "generic"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", "jwt"),
        ("plain-random-token-value", "generic"),
    ],
)
def test_detect_format(value: str, fmt: str) -> None:
    assert detect_format(value) == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_of_each_format(fmt: str) -> None:
    fake = make_placeholder("SOME_KEY", seed=SEED, fmt=fmt)
    assert re.fullmatch(SHAPES[fmt], fake), fake
    if fmt in LENGTHS:
        assert len(fake) == LENGTHS[fmt]
    assert detect_format(fake) == fmt
    assert make_placeholder("SOME_KEY", seed=SEED, fmt=fmt) == fake
    assert make_placeholder("SOME_KEY", seed=OTHER_SEED, fmt=fmt) != fake
    assert make_placeholder("OTHER_KEY", seed=SEED, fmt=fmt) != fake


def test_jwt_has_a_valid_header_and_json_payload() -> None:
    header, payload, signature = make_placeholder("T", seed=SEED, fmt="jwt").split(".")
    assert b64url_json(header) == {"alg": "HS256", "typ": "JWT"}
    claims = b64url_json(payload)
    assert isinstance(claims, dict) and claims["sub"].startswith("keyward-placeholder-")
    assert len(base64.urlsafe_b64decode(signature + "=")) == 32


def test_jwt_copies_the_real_length_where_base64_allows() -> None:
    real_header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"abc"}').decode().rstrip("=")
    for pad in range(60, 120):
        body = base64.urlsafe_b64encode(json.dumps({"x": "y" * pad}).encode()).decode()
        real = f"{real_header}.{body.rstrip('=')}.{'s' * 43}"
        fake = make_placeholder("T", seed=SEED, real=SecretValue(real))
        header, payload, _ = fake.split(".")
        assert b64url_json(header) == {"alg": "HS256", "typ": "JWT"}
        assert isinstance(b64url_json(payload), dict)
        want_payload = len(real) - len(header) - 43 - 2
        if want_payload % 4 != 1:  # no base64 text has a length of 1 mod 4
            assert len(fake) == len(real)


REALS = [
    ("OPENAI_API_KEY", "sk-proj-" + "Ab9_-xY" * 10 + "T3BlbkFJ" + "Zz0-_q" * 12),
    ("ANTHROPIC_API_KEY", "sk-ant-api03-" + "Qw3-e_R" * 13 + "xAA"),
    ("GITHUB_TOKEN", "ghp_" + "aZ09" * 9),
    ("GH_PAT", "github_pat_11ABCDEFG0123456789abc_" + "x1Y2" * 14 + "zzz"),
    ("SLACK_BOT_TOKEN", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
    ("HEX_TOKEN", "0123456789abcdef" * 4),
    ("GITLAB_TOKEN", "glpat-" + "aB3dE" * 4),
]


@pytest.mark.parametrize(("env", "real"), REALS)
def test_real_value_shape_is_copied(env: str, real: str) -> None:
    fake = make_placeholder(env, seed=SEED, real=SecretValue(real))
    assert fake != real and real not in fake
    assert len(fake) == len(real)
    assert detect_format(fake) == detect_format(real)
    # separators at the same places, and each alphanumeric run drawn from the same class
    real_runs = re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]+", real)
    fake_runs = re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]+", fake)
    assert [len(r) for r in real_runs] == [len(r) for r in fake_runs]
    for r, f in zip(real_runs, fake_runs, strict=True):
        if not r[0].isalnum():
            assert r == f
        elif r.isdigit():
            assert f.isdigit()
        elif re.fullmatch("[0-9a-f]+", r):
            assert re.fullmatch("[0-9a-f]+", f)
    assert make_placeholder(env, seed=SEED, real=SecretValue(real)) == fake


def test_known_prefix_is_kept_but_nothing_else() -> None:
    real = "xoxb-111111111111-2222222222222-" + "Secret" * 4
    fake = make_placeholder("SLACK", seed=SEED, real=SecretValue(real))
    assert fake.startswith("xoxb-")
    assert "Secret" not in fake and "1111" not in fake


def test_format_that_does_not_match_the_real_value_uses_the_provider_shape() -> None:
    fake = make_placeholder("K", seed=SEED, fmt="sk-ant", real=SecretValue("not-an-anthropic-key"))
    assert re.fullmatch(SHAPES["sk-ant"], fake)


def test_unknown_format_and_unfakeable_value_are_errors() -> None:
    with pytest.raises(PlaceholderError, match="placeholder K: unknown format 'nope'"):
        make_placeholder("K", seed=SEED, fmt="nope")
    real = "-_-_-_-_-_"
    with pytest.raises(PlaceholderError) as e:
        make_placeholder("K", seed=SEED, real=SecretValue(real))
    assert real not in str(e.value) and "placeholder K" in str(e.value)


@settings(max_examples=300, deadline=None)
@given(
    real=st.text(
        alphabet=st.sampled_from("abcdefABCDEF0123456789-_./+="), min_size=6, max_size=80
    ).filter(lambda v: sum(c.isalnum() for c in v) >= 6),
    env=st.from_regex(r"[A-Z_]{1,20}", fullmatch=True),
)
def test_any_real_value_gives_a_different_same_length_fake(real: str, env: str) -> None:
    fake = make_placeholder(env, seed=SEED, real=SecretValue(real))
    assert fake != real and real not in fake
    if detect_format(real) != "jwt":
        assert len(fake) == len(real)
