"""Load `keyward.yaml` strictly, collecting every error as `file:line: key.path: message`."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import re
import ssl
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.model import Config
from gateway.errors import ConfigError, UsageError
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


class LineMap:
    """The line of every key path of a parsed config. Only an error needs one, so the map is
    made from the text on first use, not while a large config loads."""

    __slots__ = ("_lines", "_text")

    def __init__(self, text: str = "") -> None:
        self._text = text
        self._lines: dict[Loc, int] | None = None

    def line_of(self, loc: Loc) -> int:
        if self._lines is None:
            self._lines = line_map(self._text)
        return _line_for(self._lines, loc)


@dataclass(slots=True)
class LoadedConfig:
    config: Config
    path: Path
    lines: LineMap = field(default_factory=LineMap, repr=False)
    digest: str = ""  # short hash of the config text: names the policy in audit records

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent

    def resolve_path(self, text: str) -> Path:
        """A path from the config: relative ones are relative to the config's directory."""
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def line_of(self, loc: Loc) -> int:
        return self.lines.line_of(loc)


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


_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    """One pass over the composed nodes: builds the plain data and rejects duplicate keys
    (PyYAML keeps the last). It is also the graph check: a node reached twice is an alias (of
    an anchor defined at its line), a merge key (`<<`) is refused with them, and nesting is
    bounded before anything recurses deeper. Lines are not recorded here (see line_map)."""

    def __init__(self, loader: yaml.SafeLoader, file: str, anchors: bool) -> None:
        self.loader = loader
        self.file = file
        self.issues: list[ConfigIssue] = []
        # Without a '&' in the text there is no anchor, so no alias: no node can be shared.
        self.seen: set[int] | None = set() if anchors else None

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        if self.seen is not None:
            if id(node) in self.seen:
                raise _Refused(node.start_mark, ALIASES_REFUSED)
            self.seen.add(id(node))
        if len(loc) >= MAX_DEPTH:
            raise _Refused(node.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        if type(node) is yaml.ScalarNode:
            return self._scalar(node)
        tag = node.tag
        if type(node) is yaml.MappingNode:
            out = self._mapping(node, loc)
            if tag == _MAP_TAG:
                return out
        elif type(node) is yaml.SequenceNode:
            items = [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
            if tag == _SEQ_TAG:
                return items
        # An explicit collection tag (!!set, !!omap): its nodes are checked above; PyYAML
        # builds the value (or refuses a tag it does not know).
        return self.loader.construct_document(node)

    def _scalar(self, node: yaml.Node) -> Any:
        # Plain text is most of a config: only other scalars (int, bool, null) need PyYAML.
        return node.value if node.tag == _STR_TAG else self.loader.construct_object(node)

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        seen = self.seen
        for key_node, value_node in node.value:
            if seen is not None:
                if id(key_node) in seen:
                    raise _Refused(key_node.start_mark, ALIASES_REFUSED)
                seen.add(id(key_node))
            if type(key_node) is not yaml.ScalarNode:
                raise _Refused(key_node.start_mark, "a key must be a plain value")
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor` names the anchor's line
                self.build(value_node, (*loc, "<<"))
                raise _Refused(key_node.start_mark, ALIASES_REFUSED)
            key = self._scalar(key_node)
            if key in out:
                self.issues.append(
                    ConfigIssue(
                        self.file,
                        key_node.start_mark.line + 1,
                        format_loc((*loc, key_node.value)),
                        "duplicate key",
                    )
                )
            # Plain values and empty `{}` (most of a large config) are built here, in place.
            if seen is None and type(value_node) is yaml.ScalarNode:
                out[key] = self._scalar(value_node)
            elif seen is None and value_node.tag == _MAP_TAG and not value_node.value:
                out[key] = {}
            else:
                out[key] = self.build(value_node, (*loc, key_node.value))
        return out


def line_map(text: str) -> dict[Loc, int]:
    """The line of every key path of a config already parsed (so valid YAML): for messages."""
    lines: dict[Loc, int] = {}
    try:
        node = _Loader(text).get_single_node() if text else None
    except yaml.YAMLError:
        return lines
    stack: list[tuple[yaml.Node, Loc]] = [(node, ())] if node is not None else []
    while stack:
        node, loc = stack.pop()
        lines.setdefault(loc, node.start_mark.line + 1)
        if len(loc) >= MAX_DEPTH:
            continue
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*loc, key_node.value if isinstance(key_node, yaml.ScalarNode) else "")
                lines.setdefault(child, key_node.start_mark.line + 1)
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(node.value))
    return lines


# Deeper than any real config; a bound keeps the (recursive) composer from running out of stack.
MAX_DEPTH = 64
ALIASES_REFUSED = "anchors and aliases (&, *, <<) are not allowed"
# A config is a few KiB; 200,000 host rules are ~10 MiB. Anything far past that is a mistake.
MAX_CONFIG_BYTES = 64 * 1024 * 1024


class _Refused(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark, problem: str) -> None:
        super().__init__(problem)
        self.problem_mark, self.problem = mark, problem


class _PyStrictLoader(yaml.SafeLoader):
    """Without libyaml: refuse anchors/aliases and deep nesting while composing (the pure-Python
    composer recurses per level and would otherwise run out of stack)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = yaml.parser.Parser.peek_event(self)
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark, ALIASES_REFUSED)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
            # The stub says `index: int`; PyYAML passes the key node for a mapping's values.
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._depth -= 1


# libyaml composes ~10x faster (200,000 host rules); it bounds nesting itself (1,000 levels),
# and `_Builder` refuses aliases (a node reached twice) and nesting past MAX_DEPTH.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", _PyStrictLoader)


def _parse_yaml(text: str, file: str) -> tuple[Any, _Builder | None]:
    """Compose once, then build the data in one pass over the nodes (lines: `LineMap`)."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = _Loader(text)  # checks every character first (ReaderError)
        node = loader.get_single_node()
        if node is None:
            return None, None
        builder = _Builder(loader, file, anchors="&" in text)
        return builder.build(node, ()), builder
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
            line = text.count("\n", 0, e.position) + 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if isinstance(e, yaml.reader.ReaderError):
            problem = f"character {e.character!r} is not allowed"
        raise ConfigError([ConfigIssue(file, line, "", f"YAML syntax: {problem}")]) from None
    finally:
        if loader is not None:
            loader.dispose()


# Net new tracked objects past which a load's results are frozen (see gc_paused).
FREEZE_AFTER_OBJECTS = 250_000


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a config is loaded or compiled.

    A load allocates millions of objects that all stay alive, and each burst of allocations
    started a collection that walked every one of them again: with 200,000 host rules that was
    two thirds of the load time. Nothing a load builds needs the cycle collector (reference
    counting frees it). A large load's objects are then frozen (`gc.freeze`): later
    collections, for as long as the gateway runs, no longer walk a policy that never changes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_count()[0] > FREEZE_AFTER_OBJECTS:
            gc.freeze()
        if enabled:
            gc.enable()


def parse_config_text(text: str, file: str) -> LoadedConfig:
    """Parse and validate; raises ConfigError listing every problem found."""
    with gc_paused():
        return _parse_config_text(text, file)


def _parse_config_text(text: str, file: str) -> LoadedConfig:
    data, builder = _parse_yaml(text, file)
    if builder is None or data is None:
        raise ConfigError([ConfigIssue(file, 1, "", "empty config (expected 'version: 1')")])
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "", "top level must be a mapping")])
    lines = LineMap(text)
    issues = list(builder.issues)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False, include_input=False):
            loc = _strip_tags(tuple(err["loc"]))
            issues.append(ConfigIssue(file, lines.line_of(loc), format_loc(loc), _message(err)))
    issues.extend(_cross_check(data, file, lines))
    if issues or config is None:
        issues.sort(key=lambda i: i.line)
        raise ConfigError(issues)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return LoadedConfig(config, Path(file), lines, digest)


def decode_config(data: bytes, file: str) -> str:
    """UTF-8 or a `file:line` error naming where the first bad byte is."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(file, 1, "", "larger than 64 MiB: not a config file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            [ConfigIssue(file, line, "", f"not UTF-8 text (byte 0x{data[e.start]:02x})")]
        ) from None


def load_config(path: str | Path) -> LoadedConfig:
    """Read, parse, validate, and check what the config names on this machine (the same
    checks for `check`, `run` and `serve`)."""
    p = Path(path)
    try:
        data = read_bounded(p, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise UsageError(f"{p}: config file not found (run 'keyward init' to write one)") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read config: {e.strerror or e}") from None
    loaded = parse_config_text(decode_config(data, str(p)), str(p))
    issues = check_environment(loaded)
    if issues:
        raise ConfigError(issues)
    return loaded


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refusing FIFOs, devices and anything over `limit` bytes (a
    FIFO would block the reader forever, /dev/zero never ends)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "is not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"is larger than {_size(limit)}")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"is larger than {_size(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def check_environment(loaded: LoadedConfig) -> list[ConfigIssue]:
    """What only this machine can tell: `upstream.ca_bundle` is a readable PEM bundle, the audit
    log can be written where the config says. Same checks for `check`, `run` and `serve`."""
    issues: list[ConfigIssue] = []
    file = str(loaded.path)
    cfg = loaded.config

    def issue(loc: Loc, message: str) -> None:
        issues.append(ConfigIssue(file, loaded.line_of(loc), format_loc(loc), message))

    if cfg.upstream.ca_bundle:
        bundle = loaded.resolve_path(cfg.upstream.ca_bundle)
        try:
            data = read_bounded(bundle, 16 * 1024 * 1024)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=data.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):  # SSLError is an OSError: first
            issue(("upstream", "ca_bundle"), f"{bundle} holds no PEM certificate")
        except FileNotFoundError:
            issue(("upstream", "ca_bundle"), f"{bundle} does not exist")
        except OSError as e:
            issue(("upstream", "ca_bundle"), f"{bundle} {e.strerror or e}")
    if cfg.audit.path != "-":
        path = loaded.resolve_path(cfg.audit.path)
        problem = writable_file_problem(path)
        if problem:
            issue(("audit", "path"), f"{path} {problem}")
    return issues


def writable_file_problem(path: Path) -> str | None:
    """Why a file could not be appended to at `path` (created with its directories), or None."""
    if path.is_dir():
        return "is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


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


# The keys of a host rule that _cross_check looks at.
_CROSS_CHECKED = frozenset({"headers", "basic", "tcp"})


def _cross_check(data: dict[str, Any], file: str, lines: LineMap) -> list[ConfigIssue]:
    """References between sections, checked on the raw data so they are reported together
    with schema errors: secrets named in templates and placeholders must exist."""
    issues: list[ConfigIssue] = []

    def issue(loc: Loc, message: str) -> None:
        issues.append(ConfigIssue(file, lines.line_of(loc), format_loc(loc), message))

    secrets = _mapping(data.get("secrets"))
    known = set(secrets)
    hosts = _mapping(_mapping(data.get("egress")).get("hosts"))
    for host, raw_rule in hosts.items():
        if not isinstance(raw_rule, dict) or raw_rule.keys().isdisjoint(_CROSS_CHECKED):
            continue  # most rules of a large config: nothing here refers elsewhere
        rule = raw_rule
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
        secret = _mapping(raw_ph).get("secret")
        loc = ("placeholders", str(env), "secret")
        if isinstance(secret, str) and secret not in known:
            issue(loc, f"unknown secret {secret!r}")
        elif isinstance(secret, str) and "oauth" in _mapping(secrets.get(secret)):
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
