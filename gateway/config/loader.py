"""Load `keyward.yaml` strictly, collecting every error as `file:line: key.path: message`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.cli.errors import UsageError
from gateway.config.model import Config
from gateway.policy.hosts import parse_pattern
from gateway.policy.templates import parse_template

Loc = tuple[str | int, ...]
_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# pydantic puts union-member tags into error locations; they are not keys in the file.
_UNION_TAGS = {"env", "file", "command", "oauth"}
_SOURCE_KEYS = {"client_id", "client_secret", "refresh_token"}


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.file}:{self.line}:{key} {self.message}"


class ConfigError(UsageError):
    """Every problem in a config file, one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))

    def __str__(self) -> str:
        n = len(self.issues)
        head = f"{n} error{'s' if n != 1 else ''} in config:\n" if n > 1 else ""
        return head + "\n".join(str(i) for i in self.issues)


@dataclass(slots=True)
class LoadedConfig:
    config: Config
    path: Path
    lines: dict[Loc, int] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent

    def line_of(self, loc: Loc) -> int:
        return _line_for(self.lines, loc)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _SIMPLE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            out += ("." if out else "") + key
    return out


def _line_for(lines: dict[Loc, int], loc: Loc) -> int:
    for n in range(len(loc), -1, -1):
        line = lines.get(loc[:n])
        if line is not None:
            return line
    return 1


class _Walker:
    """Maps every key path to its line and rejects duplicate keys (PyYAML keeps the last)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.issues: list[ConfigIssue] = []

    def walk(self, node: yaml.Node, loc: Loc) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
                child = (*loc, key)
                if key in seen:
                    self.issues.append(
                        ConfigIssue(
                            self.file,
                            key_node.start_mark.line + 1,
                            format_loc(child),
                            "duplicate key",
                        )
                    )
                seen.add(key)
                self.lines[child] = key_node.start_mark.line + 1
                self.walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, (*loc, i))


def parse_config_text(text: str, file: str) -> LoadedConfig:
    """Parse and validate; raises ConfigError listing every problem found."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([ConfigIssue(file, line, "", f"YAML syntax: {problem}")]) from None
    if node is None or data is None:
        raise ConfigError([ConfigIssue(file, 1, "", "empty config (expected 'version: 1')")])
    walker = _Walker(file)
    walker.walk(node, ())
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "", "top level must be a mapping")])
    issues = list(walker.issues)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False, include_input=False):
            loc = _strip_tags(tuple(err["loc"]))
            issues.append(
                ConfigIssue(file, _line_for(walker.lines, loc), format_loc(loc), _message(err))
            )
    issues.extend(_cross_check(data, file, walker.lines))
    if issues or config is None:
        raise ConfigError(sorted(issues, key=lambda i: i.line))
    return LoadedConfig(config, Path(file), walker.lines)


def load_config(path: str | Path) -> LoadedConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{p}: config file not found (run 'keyward init' to write one)") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read config: {e.strerror}") from None
    return parse_config_text(text, str(p))


def _strip_tags(loc: Loc) -> Loc:
    """Drop the union tag pydantic inserts after a secret name or an OAuth value source."""
    out: list[str | int] = []
    skipped_at = -1
    for part in loc:
        at_source = (len(out) == 2 and out[0] == "secrets") or (
            bool(out) and out[-1] in _SOURCE_KEYS
        )
        if part == "[key]":  # pydantic's marker for an error in a dict key: the key is the place
            continue
        if part in _UNION_TAGS and at_source and skipped_at != len(out):
            skipped_at = len(out)
            continue
        out.append(part)
    return tuple(out)


def _message(err: Any) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return "expected one of: env, file, command, oauth"
    return msg.removeprefix("Value error, ")


def _cross_check(data: dict[str, Any], file: str, lines: dict[Loc, int]) -> list[ConfigIssue]:
    """References between sections, checked on the raw data so they are reported together
    with schema errors: secrets named in templates and placeholders must exist."""
    issues: list[ConfigIssue] = []

    def issue(loc: Loc, message: str) -> None:
        issues.append(ConfigIssue(file, _line_for(lines, loc), format_loc(loc), message))

    secrets = _mapping(data.get("secrets"))
    known = set(secrets)
    hosts = _mapping(_mapping(data.get("egress")).get("hosts"))
    for host, raw_rule in hosts.items():
        rule = _mapping(raw_rule)
        base: Loc = ("egress", "hosts", str(host))
        headers = _mapping(rule.get("headers"))
        basic = _mapping(rule.get("basic"))
        templates: list[tuple[Loc, Any]] = [((*base, "headers", n), t) for n, t in headers.items()]
        templates += [
            ((*base, "basic", k), basic[k]) for k in ("username", "password") if k in basic
        ]
        if basic and any(str(n).lower() == "authorization" for n in headers):
            issue((*base, "basic"), "basic and an Authorization header both set")
        for loc, text in templates:
            try:
                names = parse_template(text).secrets if isinstance(text, str) else ()
            except ValueError:
                continue  # reported by the schema
            for name in names:
                if name not in known:
                    issue(loc, f"unknown secret {{{name}}} (not under 'secrets:')")
        if rule.get("allow") is False and (headers or basic):
            issue((*base, "allow"), "a denied host cannot inject credentials")
        if rule.get("tcp") is True:
            try:
                if parse_pattern(str(host)).port is None:
                    issue((*base, "tcp"), "tcp passthrough needs a host:port rule")
            except ValueError:
                pass
    for env, raw_ph in _mapping(data.get("placeholders")).items():
        name = _mapping(raw_ph).get("secret")
        loc = ("placeholders", str(env), "secret")
        if isinstance(name, str) and name not in known:
            issue(loc, f"unknown secret {name!r}")
        elif isinstance(name, str) and "oauth" in _mapping(secrets.get(name)):
            issue(loc, "placeholders cannot stand for OAuth secrets")
    ports: dict[Any, str] = {}
    for name, raw_svc in _mapping(data.get("services")).items():
        port = _mapping(raw_svc).get("listen")
        if isinstance(port, int) and port and port in ports:
            issue(("services", str(name), "listen"), f"port {port} already used by {ports[port]}")
        ports[port] = str(name)
    return issues


def _mapping(v: Any) -> dict[Any, Any]:
    return v if isinstance(v, dict) else {}
