"""Format-preserving fake credentials the agent may hold instead of real ones.

SDKs check key shapes (`sk-ant-api03-`, `xoxb-`, JWT structure) before sending anything; a fake
that fails the check pushes people to hand the agent the real key. Fakes are derived from a
per-installation seed with HMAC, so they are stable across restarts (the agent's config keeps
working) yet reveal nothing about the real value.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import string
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.config.paths import write_atomic
from gateway.credentials.secret import SecretValue
from gateway.errors import PlaceholderError

SEED_FILE = "placeholder.seed"
SEED_SIZE = 32

FORMATS = ("sk-proj", "sk-ant", "sk", "ghp", "github_pat", "xoxb", "akia", "jwt", "generic")

DIGITS = string.digits
HEX_LOWER = "0123456789abcdef"
HEX_UPPER = "0123456789ABCDEF"
LOWER = string.ascii_lowercase
UPPER = string.ascii_uppercase
LOWER_ALNUM = DIGITS + LOWER
UPPER_ALNUM = DIGITS + UPPER
LETTERS = string.ascii_letters
BASE62 = string.ascii_letters + DIGITS
BASE64URL = BASE62 + "-_"
BASE32_UPPER = UPPER + "234567"
# Smallest first: a segment of the real value is refilled from the smallest alphabet holding it.
_ALPHABETS = (DIGITS, HEX_LOWER, HEX_UPPER, LOWER, UPPER, LOWER_ALNUM, UPPER_ALNUM, LETTERS, BASE62)

# Known prefixes, most specific first; (format, prefix).
_PREFIXES = (
    ("sk-proj", "sk-proj-"),
    ("sk-ant", "sk-ant-api03-"),
    ("sk-ant", "sk-ant-"),
    ("sk", "sk-"),
    ("ghp", "ghp_"),
    ("github_pat", "github_pat_"),
    ("xoxb", "xoxb-"),
    ("akia", "AKIA"),
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_AKIA = re.compile(r"AKIA[A-Z0-9]{16}")
# A generic value keeps a short lowercase vendor prefix such as "glpat-", "pk_live_", "hf_".
_GENERIC_PREFIX = re.compile(r"(?:[a-z][a-z0-9]{1,5}[-_]){1,2}")
_JWT_HEADER = {"alg": "HS256", "typ": "JWT"}


def install_seed(state_dir: Path, source: Path) -> None:
    """Use the seed in `source` (e.g. a mounted Kubernetes Secret) as this state dir's: the
    fakes rendered into an agent's manifest are then the ones this gateway swaps."""
    seed = source.read_bytes()
    if len(seed) != SEED_SIZE:
        raise PlaceholderError(f"{source} should hold {SEED_SIZE} bytes, found {len(seed)}")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(state_dir / SEED_FILE, seed, 0o600)


def load_seed(state_dir: Path) -> bytes:
    """The installation's placeholder seed: 32 random bytes, created once (mode 0600)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / SEED_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        seed = os.urandom(SEED_SIZE)
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
            f.flush()
            os.fsync(f.fileno())
        return seed
    seed = path.read_bytes()
    if len(seed) != SEED_SIZE:
        raise PlaceholderError(
            f"{path} should hold {SEED_SIZE} bytes, found {len(seed)}; remove it to make a new "
            "seed (placeholders handed out so far will change)"
        )
    if path.stat().st_mode & 0o077:
        with contextlib.suppress(OSError):
            path.chmod(0o600)
    return seed


def detect_format(value: str) -> str:
    """The provider shape of a real value, one of FORMATS."""
    for fmt, prefix in _PREFIXES:
        if value.startswith(prefix):
            if fmt == "akia" and not _AKIA.fullmatch(value):
                continue
            return fmt
    if _JWT.fullmatch(value):
        return "jwt"
    return "generic"


def _stream(seed: bytes, env_name: str, fmt: str, attempt: int) -> Iterator[int]:
    """Deterministic bytes: HMAC-SHA256(seed, env_name | fmt | attempt | block)."""
    block = 0
    while True:
        msg = f"{env_name}\0{fmt}\0{attempt}\0{block}".encode()
        yield from hmac.new(seed, msg, hashlib.sha256).digest()
        block += 1


class _Draw:
    def __init__(self, seed: bytes, env_name: str, fmt: str, attempt: int) -> None:
        self._bytes = _stream(seed, env_name, fmt, attempt)

    def chars(self, alphabet: str, n: int) -> str:
        # Rejection sampling keeps every character of the alphabet equally likely.
        limit = 256 - 256 % len(alphabet)
        out: list[str] = []
        while len(out) < n:
            b = next(self._bytes)
            if b < limit:
                out.append(alphabet[b % len(alphabet)])
        return "".join(out)

    def raw(self, n: int) -> bytes:
        return bytes(next(self._bytes) for _ in range(n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _jwt(d: _Draw, env_name: str, length: int | None) -> str:
    header = _b64url(json.dumps(_JWT_HEADER, separators=(",", ":")).encode())
    signature = _b64url(d.raw(32))
    claims = {"sub": f"keyward-placeholder-{d.chars(HEX_LOWER, 12)}", "iat": 1700000000}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    if length is not None:
        # Pad a `jti` claim so the token has the real one's length, where base64 allows it.
        want = length - len(header) - len(signature) - 2
        base_len = len(json.dumps({**claims, "jti": ""}, separators=(",", ":")))
        approx = want * 3 // 4 - base_len
        for n in range(max(0, approx - 2), max(0, approx + 3)):
            if (4 * (base_len + n) + 2) // 3 == want:
                text = json.dumps({**claims, "jti": d.chars(BASE62, n)}, separators=(",", ":"))
                payload = _b64url(text.encode())
                break
    return f"{header}.{payload}.{signature}"


def _shaped(d: _Draw, fmt: str, env_name: str) -> str:
    """The provider's usual shape, when there is no real value to copy the length from."""
    if fmt == "sk-proj":
        return f"sk-proj-{d.chars(BASE64URL, 74)}T3BlbkFJ{d.chars(BASE64URL, 74)}"
    if fmt == "sk-ant":
        body = d.chars(BASE64URL, 86) + "-" + d.chars(BASE64URL, 6)
        return f"sk-ant-api03-{body}AA"
    if fmt == "sk":
        return f"sk-{d.chars(BASE62, 20)}T3BlbkFJ{d.chars(BASE62, 20)}"
    if fmt == "ghp":
        return f"ghp_{d.chars(BASE62, 36)}"
    if fmt == "github_pat":
        return f"github_pat_11{d.chars(UPPER_ALNUM, 20)}_{d.chars(BASE62, 59)}"
    if fmt == "xoxb":
        first = d.chars("123456789", 1) + d.chars(DIGITS, 11)
        second = d.chars("123456789", 1) + d.chars(DIGITS, 12)
        return f"xoxb-{first}-{second}-{d.chars(BASE62, 24)}"
    if fmt == "akia":
        return f"AKIA{d.chars(BASE32_UPPER, 16)}"
    if fmt == "jwt":
        return _jwt(d, env_name, None)
    return d.chars(BASE62, 40)


def _alphabet_for(segment: str) -> str:
    chars = set(segment)
    return next((a for a in _ALPHABETS if chars <= set(a)), BASE62)


def _like(d: _Draw, body: str) -> str:
    """Same length and layout as `body`: separators kept in place, each alphanumeric run refilled
    from the smallest alphabet that holds it (digits, hex, lower, upper, base62...)."""
    out = []
    for run in re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]+", body):
        if run[0] in BASE62:
            out.append(d.chars(_alphabet_for(run), len(run)))
        else:
            out.append(run)
    return "".join(out)


def _prefix_of(value: str, fmt: str) -> str:
    for f, prefix in _PREFIXES:
        if f == fmt and value.startswith(prefix):
            return prefix
    if fmt == "generic":
        m = _GENERIC_PREFIX.match(value)
        # keep a vendor prefix only when a real body follows it
        if m and len(value) - m.end() >= 16:
            return m.group(0)
    return ""


def _preserving(d: _Draw, fmt: str, env_name: str, real: str) -> str:
    """A fake with the real value's prefix, length and character classes."""
    if fmt == "jwt":
        return _jwt(d, env_name, len(real))
    prefix = _prefix_of(real, fmt)
    body = real[len(prefix) :]
    suffix = ""
    if fmt == "sk-ant" and body.endswith("AA"):
        body, suffix = body[:-2], "AA"
    if fmt == "sk-proj" or fmt == "sk":
        marker = body.find("T3BlbkFJ")
        if marker >= 0:
            left, right = body[:marker], body[marker + 8 :]
            return prefix + _like(d, left) + "T3BlbkFJ" + _like(d, right)
    return prefix + _like(d, body) + suffix


def make_placeholder(
    env_name: str,
    *,
    seed: bytes,
    fmt: str | None = None,
    real: SecretValue | None = None,
) -> str:
    """A deterministic fake for `env_name` that passes the provider's format checks.

    With `real`, the fake copies its prefix, length and character classes (when `fmt` matches
    the real value's format); it never equals or contains the real value.
    """
    real_text = real.reveal() if real is not None else None
    if fmt is None:
        fmt = detect_format(real_text) if real_text is not None else "generic"
    if fmt not in FORMATS:
        raise PlaceholderError(
            f"placeholder {env_name}: unknown format {fmt!r} (one of: {', '.join(FORMATS)})"
        )
    build: Callable[[_Draw], str]
    if real_text is not None and (fmt == "generic" or detect_format(real_text) == fmt):
        build = lambda d: _preserving(d, fmt, env_name, real_text)  # noqa: E731
    else:
        build = lambda d: _shaped(d, fmt, env_name)  # noqa: E731
    for attempt in range(16):
        fake = build(_Draw(seed, env_name, fmt, attempt))
        if real_text is None or (fake != real_text and real_text not in fake):
            return fake
    raise PlaceholderError(
        f"placeholder {env_name}: cannot make a fake that differs from the real value of secret "
        "(it has too few random characters); set a `format` for it"
    )
