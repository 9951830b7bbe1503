"""Hostile or mistaken config and secret inputs: every one is a clear `file:line` (or secret)
error, bounded in time and memory, never a hang or an internal error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.config.loader import load_config, parse_config_text
from gateway.config.model import CommandSource, FileSource
from gateway.credentials.sources import load_value
from gateway.errors import ConfigError, SecretError
from tests.support.pki import make_ca
from tests.support.wait import BOUND, wait_until

ROOT = Path(__file__).resolve().parent.parent
KEYWARD = [sys.executable, "-m", "gateway"]

ALIAS_BOMB = """version: 1
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def check(tmp: Path, text: str | bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    """`keyward check` on a file holding `text`, bounded (a hang fails the test)."""
    cfg = tmp / "keyward.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T_KEY": "sk-test-0123456789"}
    return subprocess.run(
        [*KEYWARD, "check", "-c", str(cfg), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp,
    )


def one_error(tmp: Path, text: str | bytes) -> str:
    """The ConfigError of loading a file holding `text` (what check, run and serve all do)."""
    cfg = tmp / "keyward.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    return str(e.value)


def test_alias_bomb_is_refused_at_its_line(tmp_path: Path) -> None:
    r = check(tmp_path, ALIAS_BOMB)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "keyward.yaml:2:" in r.stderr and "anchors and aliases" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_merge_keys_are_aliases_too() -> None:
    text = "version: 1\nx: &base {a: 1}\ny:\n  <<: *base\n"
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, "k.yaml")
    assert str(e.value).startswith("k.yaml:2:")


@pytest.mark.parametrize(
    ("kind", "depth"), [("[", 5000), ("{a: ", 5000), ("[", 100), ("{a: ", 100)]
)
def test_deep_nesting_is_refused_at_its_line(tmp_path: Path, kind: str, depth: int) -> None:
    closing = {"[": "]", "{a: ": "}"}
    err = one_error(tmp_path, "version: 1\nx: " + kind * depth + closing[kind] * depth + "\n")
    assert "keyward.yaml:2:" in err and "nest" in err


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    err = one_error(tmp_path, b"version: 1\negress:\n  default: d\xe9ny\n")
    assert "keyward.yaml:3:" in err and "not UTF-8" in err


def test_control_character_names_the_line(tmp_path: Path) -> None:
    err = one_error(tmp_path, "version: 1\negress:\n  default: \x07deny\n")
    assert "keyward.yaml:3:" in err


@pytest.mark.parametrize(
    ("snippet", "line", "expected"),
    [
        (
            "secrets: {k: {env: T_KEY}}\negress:\n  hosts:\n    a.test:\n"
            '      headers: {X-K: "{k}\\r\\nX-Evil: 1"}\n',
            6,
            "line break",
        ),
        ('egress:\n  hosts:\n    "10.0.0.1/8": {}\n', 4, "host bits set: write 10.0.0.0/8"),
        ('egress:\n  hosts:\n    "2001:db8::1:443": {}\n', 4, "[2001:db8::1]:443"),
        ('upstream:\n  resolve: {"a.test:443": "2001:db8::1:443"}\n', 3, "[2001:db8::1]:443"),
        ('egress:\n  hosts:\n    "https://api.example.com": {}\n', 4, "bare host name"),
        ('upstream:\n  resolve: {"https://a.test:443": "127.0.0.1:1"}\n', 3, "write host:port"),
        (
            'secrets:\n  g:\n    oauth:\n      token_url: "https://"\n      grant: client_credentials\n'
            "      client_id: {env: T_KEY}\n      client_secret: {env: T_KEY}\n",
            5,
            "has no host name",
        ),
        ('services:\n  s: {listen: 0, upstream: "https://"}\n', 3, "has no host name"),
        ('services:\n  s: {listen: 0, upstream: "https://u:p@a.test"}\n', 3, "credentials"),
    ],
    ids=["crlf", "cidr", "v6port", "v6resolve", "url-host", "url-resolve", "token", "svc", "cred"],
)
def test_mistakes_accepted_before_are_refused(snippet: str, line: int, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text("version: 1\n" + snippet, "k.yaml")
    text = str(e.value)
    assert f"k.yaml:{line}:" in text and expected in text, text


def test_check_runs_the_checks_run_and_serve_run(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    (tmp_path / "auditdir").mkdir()
    cases = [
        ("upstream: {ca_bundle: missing.pem}\n", "2", "does not exist"),
        (f"upstream: {{ca_bundle: {garbage}}}\n", "2", "holds no PEM certificate"),
        ("audit: {path: auditdir}\n", "2", "is a directory"),
        ("audit: {path: garbage.pem/x.jsonl}\n", "2", "is not a directory"),
    ]
    for snippet, line, expected in cases:
        err = one_error(tmp_path, "version: 1\n" + snippet)
        assert f"keyward.yaml:{line}:" in err and expected in err, err
    ca = make_ca(tmp_path / "pki")
    cfg = tmp_path / "keyward.yaml"
    cfg.write_text(f"version: 1\nupstream: {{ca_bundle: {ca.path}}}\n")
    assert load_config(cfg).config.upstream.ca_bundle == str(ca.path)


def test_run_refuses_an_audit_override_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "keyward.yaml").write_text("version: 1\n")
    r = subprocess.run(
        [*KEYWARD, "run", "-c", "keyward.yaml", "--audit", "d", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "KEYWARD_STATE": str(tmp_path / "s")},
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "audit log d is a directory" in r.stderr, r.stderr


def test_large_config_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    calls: list[int] = []
    from gateway.config import loader

    real = loader._Loader.get_single_node

    def counting(self: yaml.SafeLoader) -> object:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(loader._Loader, "get_single_node", counting)
    monkeypatch.setattr(yaml, "safe_load", lambda *a, **k: pytest.fail("parsed a second time"))
    monkeypatch.setattr(yaml, "compose", lambda *a, **k: pytest.fail("parsed a second time"))
    hosts = "".join(f"    h{i}.example.test: {{}}\n" for i in range(2000))
    cfg = tmp_path / "k.yaml"
    cfg.write_text("version: 1\negress:\n  hosts:\n" + hosts)
    assert len(load_config(cfg).config.egress.hosts) == 2000
    assert calls == [1]


# -- secret sources ---------------------------------------------------------------------------
def file_failure(path: Path) -> str:
    """The error for a `file:` source at `path`, which must come back (not hang)."""
    out: list[str] = []

    def attempt() -> None:
        try:
            load_value("k", FileSource(file=str(path)), base_dir=path.parent, dotenv={}, environ={})
            out.append("loaded")
        except SecretError as e:
            out.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert out, "reading the secret file hung"
    return out[0]


def test_fifo_secret_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "is not a regular file" in file_failure(fifo)


def test_device_secret_file_is_refused() -> None:
    assert "is not a regular file" in file_failure(Path("/dev/zero"))


def test_big_secret_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    assert "larger than 64 KiB" in file_failure(big)


def test_command_is_bounded_by_its_timeout_whatever_its_children_do(tmp_path: Path) -> None:
    """A grandchild in a session of its own keeps the pipe open and survives the group kill."""
    pidfile = tmp_path / "pid"
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 3600' & echo value"
    src = CommandSource(command=["sh", "-c", script], timeout=1)
    out: list[str] = []

    def attempt() -> None:
        try:
            load_value("k", src, base_dir=tmp_path, dotenv={}, environ={})
            out.append("loaded")
        except SecretError as e:
            out.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(BOUND)  # a bound on a hang: the grandchild holds the pipe for an hour
    try:
        assert out, "the loader is still waiting for the grandchild's pipe"
        assert "timed out after 1s" in out[0]
    finally:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the pid")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_command_printing_without_end_is_cut_off(tmp_path: Path) -> None:
    src = CommandSource(command=["cat", "/dev/zero"], timeout=20)
    with pytest.raises(SecretError) as e:
        load_value("k", src, base_dir=tmp_path, dotenv={}, environ={})
    assert "printed more than 64 KiB" in str(e.value)


def test_without_libyaml_the_same_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import loader

    monkeypatch.setattr(loader, "_Loader", loader._PyStrictLoader)
    for text, expected in (
        (ALIAS_BOMB, "anchors and aliases"),
        ("version: 1\nx: " + "[" * 5000 + "\n", "nested deeper than"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_config_text(text, "k.yaml")
        assert str(e.value).startswith("k.yaml:2:") and expected in str(e.value)
    assert parse_config_text("version: 1\n", "k.yaml").config.version == 1


@pytest.mark.parametrize(
    "snippet",
    [
        "x:\n  <<: {a: 1}\n",  # a merge key needs no alias to merge
        "x:\n  [a, b]: 1\n",  # a key that is a list
        "x:\n  *a : 1\ny: &a k\n",  # an alias used before its anchor
    ],
    ids=["merge-inline", "list-key", "alias-key"],
)
def test_yaml_graph_features_are_refused_at_their_line(snippet: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text("version: 1\n" + snippet, "k.yaml")
    text = str(e.value)
    assert text.startswith(("k.yaml:2:", "k.yaml:3:")), text
    assert "anchors and aliases" in text or "plain value" in text or "YAML syntax" in text, text


def test_duplicate_keys_are_named_however_they_are_spelled() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text(
            "version: 1\negress:\n  hosts:\n    a.test: {}\n    'a.test': {}\n", "k.yaml"
        )
    assert 'k.yaml:5: egress.hosts."a.test": duplicate key' in str(e.value), str(e.value)
