"""The strict loader: every error names file:line and the key path; all errors are collected."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.config.loader import parse_config_text
from gateway.config.model import Config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config_text(text, "cfg/keyward.yaml")
    return [str(i) for i in exc.value.issues]


def test_examples_and_starter_load() -> None:
    for path in (ROOT / "examples" / "keyward.yaml", ROOT / "gateway" / "config" / "starter.yaml"):
        parse_config_text(path.read_text(), str(path))


def test_all_errors_collected_with_lines_and_key_paths() -> None:
    text = """version: 1
secrets:
  openai: { env: OPENAI_API_KEY }
  bad: { nope: 1 }
  bad2: { env: X, extra: 1 }
  g:
    oauth:
      token_url: http://tokens.example
      grant: refresh_token
      client_id: { env: A, zzz: 1 }
egress:
  default: sometimes
  hosts:
    api.github.com:
      headers: { Authorization: "Bearer {github}" }
      deny: ["DELETE /repos/**", "bogus"]
    "bad host!": {}
    "*.x.com": { wat: 1 }
    "y.com": { headers: { X: "{unclosed" } }
placeholders:
  OPENAI_API_KEY: { secret: nope }
"""
    got = errors(text)
    expected = [
        "cfg/keyward.yaml:4: secrets.bad: expected one of the keys env, file, command, oauth",
        "cfg/keyward.yaml:5: secrets.bad2.extra: unknown key",
        "cfg/keyward.yaml:8: secrets.g.oauth.token_url: token_url must be an https:// URL",
        "cfg/keyward.yaml:10: secrets.g.oauth.client_id.zzz: unknown key",
        "cfg/keyward.yaml:15: egress.hosts.\"api.github.com\".headers.Authorization: unknown secret {github} (not under 'secrets:')",
        "cfg/keyward.yaml:16: egress.hosts.\"api.github.com\".deny[1]: expected 'METHOD /path/glob', got 'bogus'",
        "cfg/keyward.yaml:17: egress.hosts.\"bad host!\": bad host pattern 'bad host!': give a host, host:port, *.suffix or CIDR",
        'cfg/keyward.yaml:18: egress.hosts."*.x.com".wat: unknown key',
        "cfg/keyward.yaml:21: placeholders.OPENAI_API_KEY.secret: unknown secret 'nope'",
    ]
    for line in expected:
        assert line in got
    assert any(e.startswith("cfg/keyward.yaml:12: egress.default:") for e in got)
    assert any(
        e.startswith('cfg/keyward.yaml:19: egress.hosts."y.com".headers.X: unclosed') for e in got
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "cfg/keyward.yaml:1: empty config"),
        ("version: 2\n", "cfg/keyward.yaml:1: version:"),
        ("version: 1\nversion: 1\n", "cfg/keyward.yaml:2: version: duplicate key"),
        ("version: 1\negress: [\n", "cfg/keyward.yaml:"),
        ("version: 1\nbogus: 1\n", "cfg/keyward.yaml:2: bogus: unknown key"),
        ("version: 1\nsecrets:\n  a: { command: [] }\n", "cfg/keyward.yaml:3: secrets.a.command:"),
        (
            "version: 1\nsecrets:\n  a: { env: A }\negress:\n  hosts:\n    x.com: { allow: false, headers: { X: '{a}' } }\n",
            'cfg/keyward.yaml:6: egress.hosts."x.com".allow: a denied host cannot inject credentials',
        ),
        (
            "version: 1\negress:\n  hosts:\n    x.com: { tcp: true }\n",
            'cfg/keyward.yaml:4: egress.hosts."x.com".tcp: tcp passthrough needs a host:port rule',
        ),
        (
            "version: 1\negress:\n  hosts:\n    X.com: {}\n    x.com.: {}\n",
            "is the same rule as",
        ),
        (
            "version: 1\nupstream:\n  resolve: { 'api.x.com': '127.0.0.1:1' }\n",
            "cfg/keyward.yaml:3: upstream.resolve: resolve key 'api.x.com' must be host:port",
        ),
        (
            "version: 1\nservices:\n  a: { listen: 1, upstream: ftp://x }\n",
            "cfg/keyward.yaml:3: services.a.upstream: upstream must be an http:// or https:// URL",
        ),
        (
            "version: 1\nsecrets:\n  g: { oauth: { token_url: 'https://t.example', grant: refresh_token, client_id: { env: A } } }\n",
            "grant refresh_token needs a refresh_token source",
        ),
    ],
)
def test_bad_inputs(text: str, expected: str) -> None:
    assert any(expected in e for e in errors(text)), errors(text)


def test_secret_values_never_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-REALVALUE-never-print")
    text = "version: 1\nsecrets:\n  openai: { env: OPENAI_API_KEY, x: 1 }\n"
    assert all("REALVALUE" not in e for e in errors(text))


def test_schema_accepts_examples() -> None:
    schema = Config.model_json_schema()
    for path in (ROOT / "examples" / "keyward.yaml", ROOT / "gateway" / "config" / "starter.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "bogus": 1}, schema)
    json.dumps(schema)
