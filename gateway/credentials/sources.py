"""Load secret values from env, .env, files and commands, once, at start-up.

Every failure names the secret and where it was looked for, never a value, and never what a
command printed (a failing password manager may print the secret, or a prompt containing it).
All secrets are resolved before the gateway starts so a missing one is an error, not a request
silently sent without credentials.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from gateway.config.loader import read_bounded
from gateway.config.model import (
    CommandSource,
    EnvSource,
    FileSource,
    OAuthSource,
)
from gateway.credentials.redact import Redactor
from gateway.credentials.secret import SecretValue
from gateway.credentials.store import OAuthCredentials, SecretStore
from gateway.errors import SecretError, SecretsError

__all__ = [
    "SecretError",
    "SecretsError",
    "load_secrets",
    "load_value",
    "read_dotenv",
]

log = logging.getLogger("keyward")

ValueSource = EnvSource | FileSource | CommandSource
AnySource = EnvSource | FileSource | CommandSource | OAuthSource

_DOTENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_DOTENV_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a simple .env file (KEY=VALUE, quotes, # comments, `export ` prefix).

    The result is never put into os.environ. A line that cannot be parsed is skipped with a
    warning naming the file and line, not its content.
    """
    out: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[7:].lstrip()
        key, sep, rest = stripped.partition("=")
        key = key.strip()
        if not sep or not _DOTENV_KEY.fullmatch(key):
            log.warning("%s:%d: not a KEY=VALUE line; skipped", path, lineno)
            continue
        value = _dotenv_value(rest.strip())
        if value is None:
            log.warning("%s:%d: unterminated quote in %s; skipped", path, lineno, key)
            continue
        out[key] = value
    return out


def _dotenv_value(rest: str) -> str | None:
    if rest[:1] == "'":
        end = rest.find("'", 1)
        return rest[1:end] if end > 0 else None
    if rest[:1] == '"':
        chars: list[str] = []
        i = 1
        while i < len(rest):
            ch = rest[i]
            if ch == "\\" and i + 1 < len(rest):
                nxt = rest[i + 1]
                chars.append(_DOTENV_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if ch == '"':
                return "".join(chars)
            chars.append(ch)
            i += 1
        return None
    # Unquoted: an inline comment starts at " #".
    hit = re.search(r"\s#", rest)
    return (rest[: hit.start()] if hit else rest).strip()


def _loose_mode(path: Path) -> int | None:
    """The permission bits if group or others may read the file, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return stat.S_IMODE(mode) if mode & 0o077 else None


def _check_value(name: str, where: str, value: str) -> SecretValue:
    if not value:
        raise SecretError(name, where, "is empty")
    if any(c in value for c in "\r\n\0"):
        raise SecretError(name, where, "contains a line break or NUL (not allowed in headers)")
    return SecretValue(value)


def _from_env(
    name: str, src: EnvSource, dotenv: Mapping[str, str], environ: Mapping[str, str]
) -> SecretValue:
    where = f"env {src.env}"
    if src.env in environ:
        return _check_value(name, where, environ[src.env])
    if src.env in dotenv:
        return _check_value(name, f"{where} (from .env)", dotenv[src.env])
    raise SecretError(name, where, "is not set")


# A secret is a key or a token: anything larger is a mistake (or /dev/zero).
MAX_SECRET_BYTES = 64 * 1024


def secret_file_path(src: FileSource, base_dir: Path) -> Path:
    """Where a `file:` source is read from: `~` expanded, relative to the config's dir."""
    path = Path(src.file).expanduser()
    return path if path.is_absolute() else base_dir / path


def secret_files(secrets: Mapping[str, AnySource], base_dir: Path) -> dict[str, Path]:
    """Every file a secret (or an OAuth field of one) is read from, by secret name (an OAuth
    field as `name.field`)."""
    out: dict[str, Path] = {}
    for name, src in secrets.items():
        if isinstance(src, FileSource):
            out[name] = secret_file_path(src, base_dir)
        elif isinstance(src, OAuthSource):
            for field in ("client_id", "client_secret", "refresh_token"):
                fsrc = getattr(src.oauth, field)
                if isinstance(fsrc, FileSource):
                    out[f"{name}.{field}"] = secret_file_path(fsrc, base_dir)
    return out


def _from_file(name: str, src: FileSource, base_dir: Path) -> SecretValue:
    path = secret_file_path(src, base_dir)
    where = f"file {src.file}"
    try:
        data = read_bounded(path, MAX_SECRET_BYTES)
    except FileNotFoundError:
        raise SecretError(name, where, "does not exist") from None
    except IsADirectoryError:
        raise SecretError(name, where, "is a directory") from None
    except PermissionError:
        raise SecretError(name, where, "is not readable (permission denied)") from None
    except OSError as e:
        problem = e.strerror or str(e)
        if e.errno == errno.EINVAL:
            problem = "is not a regular file (a FIFO, socket or device)"
        elif e.errno != errno.EFBIG:
            problem = f"cannot be read ({problem})"
        raise SecretError(name, where, problem) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(name, where, "is not UTF-8 text") from None
    value = _check_value(name, where, text.rstrip("\r\n"))
    mode = _loose_mode(path)
    if mode is not None:
        log.warning(
            "secret %r: file %s is readable by group/other (mode %04o); run chmod 600 on it",
            name,
            path,
            mode,
        )
    return value


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _read_until(proc: subprocess.Popen[bytes], deadline: float) -> tuple[bytes, str | None]:
    """Collect stdout (stderr is read and dropped) until both pipes close or `deadline`.

    Not communicate(): a grandchild that inherited the pipes keeps them open after the command
    exits, and a command may print without end. Returns (stdout, why it stopped early or None).
    """
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    out += chunk
                    if len(out) > MAX_SECRET_BYTES:
                        return bytes(out), "too-much"
    return bytes(out), None


def _from_command(name: str, src: CommandSource, base_dir: Path) -> SecretValue:
    where = f"command {src.command[0]}"
    try:
        proc = subprocess.Popen(
            src.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=base_dir,
            start_new_session=True,  # so a timeout kills anything it started, too
        )
    except FileNotFoundError:
        raise SecretError(name, where, "was not found") from None
    except PermissionError:
        raise SecretError(name, where, "is not executable") from None
    except OSError as e:
        raise SecretError(name, where, f"could not start ({e.strerror})") from None
    deadline = time.monotonic() + src.timeout
    try:
        # Output is never echoed, not even stderr: it may be the secret, or part of it.
        out, stopped = _read_until(proc, deadline)
        if stopped is None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stopped = "timeout"
    finally:
        if stopped is not None or proc.poll() is None:
            _kill_group(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)  # SIGKILLed: reaped at once (a zombie grandchild is init's)
    if stopped == "timeout":
        raise SecretError(name, where, f"timed out after {src.timeout:g}s and was killed")
    if stopped == "too-much":
        raise SecretError(name, where, f"printed more than {MAX_SECRET_BYTES >> 10} KiB")
    if proc.returncode != 0:
        status = (
            f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        )
        raise SecretError(name, where, f"exited with {status} (its output is not shown)")
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(name, where, "printed something that is not UTF-8 text") from None
    if not text.strip():
        raise SecretError(name, where, "printed nothing")
    return _check_value(name, where, text.rstrip("\r\n"))


def load_value(
    name: str,
    source: ValueSource,
    *,
    base_dir: Path,
    dotenv: Mapping[str, str],
    environ: Mapping[str, str],
) -> SecretValue:
    """Load one value. Raises SecretError naming `name` and the source."""
    if isinstance(source, EnvSource):
        return _from_env(name, source, dotenv, environ)
    if isinstance(source, FileSource):
        return _from_file(name, source, base_dir)
    if isinstance(source, CommandSource):
        return _from_command(name, source, base_dir)
    raise TypeError(f"secret {name!r}: not a value source: {type(source).__name__}")


def _oauth_field(
    name: str,
    field: str,
    source: ValueSource,
    *,
    base_dir: Path,
    dotenv: Mapping[str, str],
    environ: Mapping[str, str],
) -> SecretValue:
    try:
        return load_value(name, source, base_dir=base_dir, dotenv=dotenv, environ=environ)
    except SecretError as e:
        raise SecretError(name, f"oauth {field}: {e.source}", e.problem) from None


def secret_env_names(secrets: Mapping[str, AnySource]) -> frozenset[str]:
    """Every environment variable a secret (or an OAuth field) is read from: never given to an
    agent."""
    names: set[str] = set()
    for src in secrets.values():
        if isinstance(src, OAuthSource):
            fields = (src.oauth.client_id, src.oauth.client_secret, src.oauth.refresh_token)
            names.update(f.env for f in fields if isinstance(f, EnvSource))
        elif isinstance(src, EnvSource):
            names.add(src.env)
    return frozenset(names)


def withdraw_env(names: frozenset[str]) -> dict[str, str]:
    """Remove the variables secrets are read from out of this process's environment, so no
    process it starts inherits them, and return the environment as it was, to load from."""
    before = dict(os.environ)
    for name in names:
        os.environ.pop(name, None)
    return before


def load_secrets(
    secrets: Mapping[str, AnySource],
    *,
    config_dir: Path,
    environ: Mapping[str, str] | None = None,
    redactor: Redactor | None = None,
) -> SecretStore:
    """Resolve every secret now; raise SecretsError listing all failures at once."""
    env = os.environ if environ is None else environ
    dotenv_path = config_dir / ".env"
    dotenv: dict[str, str] = {}
    errors: list[SecretError] = []
    if dotenv_path.is_file():
        try:
            dotenv = read_dotenv(dotenv_path)
        except (OSError, UnicodeDecodeError):
            errors.append(SecretError(None, f"{dotenv_path}:", "cannot be read as UTF-8 text"))

    def load(name: str, src: ValueSource, field: str | None = None) -> SecretValue:
        if field is None:
            return load_value(name, src, base_dir=config_dir, dotenv=dotenv, environ=env)
        return _oauth_field(name, field, src, base_dir=config_dir, dotenv=dotenv, environ=env)

    values: dict[str, SecretValue] = {}
    oauth: dict[str, OAuthCredentials] = {}
    env_vars = secret_env_names(secrets)
    used_dotenv = False
    for name, src in secrets.items():
        if isinstance(src, OAuthSource):
            cfg = src.oauth
            fields = {
                "client_id": cfg.client_id,
                "client_secret": cfg.client_secret,
                "refresh_token": cfg.refresh_token,
            }
            loaded: dict[str, SecretValue | None] = {}
            ok = True
            for field, fsrc in fields.items():
                if fsrc is None:
                    loaded[field] = None
                    continue
                if isinstance(fsrc, EnvSource):
                    used_dotenv |= fsrc.env not in env and fsrc.env in dotenv
                try:
                    loaded[field] = load(name, fsrc, field)
                except SecretError as e:
                    errors.append(e)
                    ok = False
            if ok:
                client_id = loaded["client_id"]
                assert client_id is not None
                oauth[name] = OAuthCredentials(
                    name, cfg, client_id, loaded["client_secret"], loaded["refresh_token"]
                )
            continue
        if isinstance(src, EnvSource):
            used_dotenv |= src.env not in env and src.env in dotenv
        try:
            values[name] = load(name, src)
        except SecretError as e:
            errors.append(e)
    if errors:
        raise SecretsError(errors)
    if used_dotenv:
        mode = _loose_mode(dotenv_path)
        if mode is not None:
            log.warning(
                "%s holds secrets and is readable by group/other (mode %04o); run chmod 600 on it",
                dotenv_path,
                mode,
            )
    return SecretStore(values, oauth=oauth, env_vars=env_vars, redactor=redactor)
