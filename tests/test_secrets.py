"""SecretValue, the secret sources and the store: values load, and never show up in errors."""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.cli.main import exit_code
from gateway.config.loader import load_config
from gateway.config.model import CommandSource, EnvSource, FileSource, OAuthConfig, OAuthSource
from gateway.credentials.redact import global_redactor
from gateway.credentials.secret import SecretValue
from gateway.credentials.sources import load_secrets, load_value, read_dotenv
from gateway.credentials.store import SecretStore
from gateway.errors import KeywardError, SecretError, SecretsError, StaleTokenError
from tests.support.wait import BOUND, wait_until

VALUE = "sk-live-VALUE-must-never-print-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def load(src: EnvSource | FileSource | CommandSource, tmp: Path, **env: str) -> SecretValue:
    return load_value("openai", src, base_dir=tmp, dotenv={}, environ=env)


def failure(src: EnvSource | FileSource | CommandSource, tmp: Path, **env: str) -> str:
    with pytest.raises(SecretError) as e:
        load(src, tmp, **env)
    text = str(e.value)
    assert VALUE not in text
    assert text.startswith("secret 'openai': ")
    return text


# -- SecretValue -------------------------------------------------------------------------


def test_secret_value_never_prints() -> None:
    s = SecretValue(VALUE)
    rendered = [
        repr(s),
        str(s),
        f"{s}",
        f"{s!r}",
        f"{s:>60}",
        f"{s:s}",
        "%s %r" % (s, s),  # noqa: UP031
        "{}".format(s),  # noqa: UP032
        repr([s, {"k": s}]),
    ]
    for text in rendered:
        assert VALUE not in text
        assert "redacted" in text
    assert s.reveal() == VALUE


@pytest.mark.parametrize(
    "op",
    [pickle.dumps, copy.copy, copy.deepcopy, hash, lambda s: s.__reduce_ex__(2)],
    ids=["pickle", "copy", "deepcopy", "hash", "reduce_ex"],
)
def test_secret_value_cannot_be_pickled_copied_or_hashed(op: object) -> None:
    with pytest.raises(TypeError):
        op(SecretValue(VALUE))  # type: ignore[operator]


def test_secret_value_compares_by_value_and_is_immutable() -> None:
    a, b = SecretValue(VALUE), SecretValue(VALUE)
    assert a == b
    assert (a != b) is False
    assert a != SecretValue(VALUE + "x")
    assert a != VALUE  # never equal to a plain string
    with pytest.raises(AttributeError):
        a.x = 1  # type: ignore[attr-defined]
    assert not hasattr(a, "__dict__")
    with pytest.raises(TypeError):
        SecretValue(b"bytes")  # type: ignore[arg-type]


def test_secret_value_in_a_traceback_is_redacted() -> None:
    code = textwrap.dedent(
        f"""
        import traceback
        from gateway.credentials.secret import SecretValue
        s = SecretValue({VALUE!r})
        try:
            raise RuntimeError(f"bad token {{s}} {{s!r}}")
        except RuntimeError:
            traceback.print_exc()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "bad token <redacted> SecretValue(<redacted>)" in proc.stderr
    assert VALUE not in proc.stderr + proc.stdout


# -- .env --------------------------------------------------------------------------------


def test_read_dotenv_parses_and_never_touches_os_environ(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".env"
    path.write_text(
        textwrap.dedent(
            """\
            # comment
            PLAIN=plain-value
            export EXPORTED=exported-value
              SPACED = spaced value   # trailing comment
            SINGLE='single # not a comment'
            DOUBLE="line\\nbreak \\"quoted\\""
            HASH=abc#def
            EMPTY=
            this line is broken and mentions hunter2-secret
            BROKEN="unterminated hunter2-secret
            PLAIN=second-wins
            """
        )
    )
    with caplog.at_level(logging.WARNING, logger="keyward"):
        env = read_dotenv(path)
    assert env == {
        "PLAIN": "second-wins",
        "EXPORTED": "exported-value",
        "SPACED": "spaced value",
        "SINGLE": "single # not a comment",
        "DOUBLE": 'line\nbreak "quoted"',
        "HASH": "abc#def",
        "EMPTY": "",
    }
    assert "EXPORTED" not in os.environ and "PLAIN" not in os.environ
    assert f"{path}:9" in caplog.text and f"{path}:10" in caplog.text
    assert "hunter2" not in caplog.text


# -- env ---------------------------------------------------------------------------------


def test_env_from_environ_first_then_dotenv(tmp_path: Path) -> None:
    src = EnvSource(env="OPENAI_API_KEY")
    both = load_value(
        "openai",
        src,
        base_dir=tmp_path,
        dotenv={"OPENAI_API_KEY": "from-dotenv-value"},
        environ={"OPENAI_API_KEY": VALUE},
    )
    assert both.reveal() == VALUE
    only_dotenv = load_value(
        "openai", src, base_dir=tmp_path, dotenv={"OPENAI_API_KEY": VALUE}, environ={}
    )
    assert only_dotenv.reveal() == VALUE


def test_env_not_set(tmp_path: Path) -> None:
    msg = failure(EnvSource(env="OPENAI_API_KEY"), tmp_path)
    assert msg == "secret 'openai': env OPENAI_API_KEY is not set"


def test_env_empty(tmp_path: Path) -> None:
    msg = failure(EnvSource(env="OPENAI_API_KEY"), tmp_path, OPENAI_API_KEY="")
    assert msg == "secret 'openai': env OPENAI_API_KEY is empty"


def test_env_with_line_break_is_refused_without_echo(tmp_path: Path) -> None:
    msg = failure(EnvSource(env="K"), tmp_path, K=VALUE + "\r\nX-Evil: 1")
    assert "env K" in msg and "line break" in msg


# -- file --------------------------------------------------------------------------------


def test_file_relative_to_config_dir_and_newline_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    key = tmp_path / "secrets" / "openai.key"
    key.write_text(VALUE + "\n")
    key.chmod(0o600)
    assert load(FileSource(file="./secrets/openai.key"), tmp_path).reveal() == VALUE
    key.write_text(VALUE + "\r\n\n")
    assert load(FileSource(file="secrets/openai.key"), tmp_path).reveal() == VALUE
    assert load(FileSource(file=str(key)), Path("/nonexistent")).reveal() == VALUE


def test_file_empty(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("\n")
    assert failure(FileSource(file="k"), tmp_path) == "secret 'openai': file k is empty"


def test_file_missing_and_directory(tmp_path: Path) -> None:
    assert failure(FileSource(file="nope.key"), tmp_path) == (
        "secret 'openai': file nope.key does not exist"
    )
    (tmp_path / "d").mkdir()
    assert failure(FileSource(file="d"), tmp_path) == "secret 'openai': file d is a directory"


def test_file_not_utf8_and_multiline(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xff\xfe" + VALUE.encode())
    assert "is not UTF-8" in failure(FileSource(file="bin"), tmp_path)
    (tmp_path / "two").write_text(VALUE + "\nsecond-line\n")
    assert "line break" in failure(FileSource(file="two"), tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_file_unreadable(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text(VALUE)
    key.chmod(0o000)
    assert "permission denied" in failure(FileSource(file="k"), tmp_path)


def test_file_readable_by_others_warns_naming_the_file_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "k"
    key.write_text(VALUE)
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="keyward"):
        assert load(FileSource(file="k"), tmp_path).reveal() == VALUE
    assert str(key) in caplog.text and "0644" in caplog.text
    assert VALUE not in caplog.text
    caplog.clear()
    key.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="keyward"):
        load(FileSource(file="k"), tmp_path)
    assert caplog.text == ""


# -- command -----------------------------------------------------------------------------


def py(code: str, timeout: float = 120) -> CommandSource:
    """Room for a loaded machine: only the timeout test expects the timeout to fire."""
    return CommandSource(command=[sys.executable, "-c", code], timeout=timeout)


def test_command_output_with_newline_stripped(tmp_path: Path) -> None:
    assert load(py(f"print({VALUE!r})"), tmp_path).reveal() == VALUE


def test_command_runs_without_a_shell_in_the_config_dir(tmp_path: Path) -> None:
    literal = "a;b$(id)`x`|c>d"
    src = CommandSource(command=["printf", "%s", literal])
    assert load(src, tmp_path).reveal() == literal
    assert not (tmp_path / "d").exists()
    (tmp_path / "rel.txt").write_text(VALUE)
    assert load(CommandSource(command=["cat", "rel.txt"]), tmp_path).reveal() == VALUE


def test_command_failure_never_echoes_stdout_or_stderr(tmp_path: Path) -> None:
    code = f"import sys; print({VALUE!r}); print('err ' + {VALUE!r}, file=sys.stderr); sys.exit(3)"
    msg = failure(py(code), tmp_path)
    assert msg.startswith(f"secret 'openai': command {sys.executable} exited with status 3")
    assert "err" not in msg


def test_command_killed_by_signal(tmp_path: Path) -> None:
    msg = failure(py("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"), tmp_path)
    assert "exited with signal 15" in msg


def test_command_empty_output(tmp_path: Path) -> None:
    msg = failure(py("print()"), tmp_path)
    assert msg == f"secret 'openai': command {sys.executable} printed nothing"


def test_command_not_found(tmp_path: Path) -> None:
    msg = failure(CommandSource(command=["no-such-command-keyward-test", VALUE]), tmp_path)
    assert msg == "secret 'openai': command no-such-command-keyward-test was not found"


def test_command_timeout_kills_it_and_its_children(tmp_path: Path) -> None:
    """The command and its child (which holds the output pipe open) are killed at the timeout:
    waiting for the pipe to close would take the child's hour."""
    pidfile = tmp_path / "child.pid"
    code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "3600"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        print({VALUE!r}, flush=True)
        time.sleep(3600)
        """
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(failure, py(code, timeout=1.0), tmp_path)
        try:
            msg = loading.result(timeout=BOUND)  # a bound on a hang, not on speed
        except concurrent.futures.TimeoutError:
            if pidfile.exists():  # unblock the loader (kill the command's group) before failing
                os.killpg(os.getpgid(int(pidfile.read_text())), signal.SIGKILL)
            pytest.fail("the loader waited for the command's child instead of killing it")
    assert "timed out after 1s and was killed" in msg
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except FileNotFoundError:
            return True
        return " Z " in stat  # killed, waiting for its reaper (not us: it is not our child)

    wait_until(gone, what="the command's child to be killed")


# -- load_secrets and the store -----------------------------------------------------------

OAUTH = OAuthConfig(
    token_url="https://oauth.example.test/token",
    grant="refresh_token",
    client_id=EnvSource(env="G_CLIENT_ID"),
    client_secret=EnvSource(env="G_CLIENT_SECRET"),
    refresh_token=FileSource(file="refresh.token"),
)


def test_load_secrets_collects_every_failure_without_values(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("")
    secrets = {
        "openai": EnvSource(env="OPENAI_API_KEY"),
        "anthropic": FileSource(file="./anthropic.key"),
        "empty": FileSource(file="empty.key"),
        "cmd": py(f"import sys; print({VALUE!r}); sys.exit(1)"),
        "ok": EnvSource(env="OK_KEY"),
        "google": OAuthSource(oauth=OAUTH),
    }
    with pytest.raises(SecretsError) as e:
        load_secrets(secrets, config_dir=tmp_path, environ={"OK_KEY": VALUE, "G_CLIENT_ID": VALUE})
    err = e.value
    assert isinstance(err, KeywardError) and exit_code(err) == 2
    lines = str(err).splitlines()
    assert lines == [
        "secret 'openai': env OPENAI_API_KEY is not set",
        "secret 'anthropic': file ./anthropic.key does not exist",
        "secret 'empty': file empty.key is empty",
        f"secret 'cmd': command {sys.executable} exited with status 1 (its output is not shown)",
        "secret 'google': oauth client_secret: env G_CLIENT_SECRET is not set",
        "secret 'google': oauth refresh_token: file refresh.token does not exist",
    ]
    assert len(err.errors) == 6 and all(isinstance(x, SecretError) for x in err.errors)
    assert VALUE not in str(err)


def test_load_secrets_reads_dotenv_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={VALUE}\n")
    store = load_secrets(
        {"openai": EnvSource(env="OPENAI_API_KEY")}, config_dir=tmp_path, environ={}
    )
    assert store.resolve("openai") == VALUE
    assert "OPENAI_API_KEY" not in os.environ


def test_store_resolves_and_lists_env_vars(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_text("file-secret-value\n")
    (tmp_path / "refresh.token").write_text("refresh-token-value\n")
    environ = {
        "OPENAI_API_KEY": VALUE,
        "G_CLIENT_ID": "client-id-value",
        "G_CLIENT_SECRET": "client-secret-value",
    }
    store = load_secrets(
        {
            "openai": EnvSource(env="OPENAI_API_KEY"),
            "a": FileSource(file="a.key"),
            "google": OAuthSource(oauth=OAUTH),
        },
        config_dir=tmp_path,
        environ=environ,
    )
    assert store.names() == {"openai", "a", "google"}
    assert store.resolve("openai") == VALUE and store.resolve("a") == "file-secret-value"
    assert store.get("openai") == SecretValue(VALUE)
    assert store.env_vars() == {"OPENAI_API_KEY", "G_CLIENT_ID", "G_CLIENT_SECRET"}
    creds = store.oauth()["google"]
    assert creds.config.token_url == "https://oauth.example.test/token"
    assert creds.client_id.reveal() == "client-id-value"
    assert creds.client_secret is not None and creds.client_secret.reveal() == "client-secret-value"
    assert creds.refresh_token is not None and creds.refresh_token.reveal() == "refresh-token-value"
    with pytest.raises(KeyError):
        store.resolve("missing")
    # every loaded value is known to the store's redactor and the process-wide one
    text = f"{VALUE} file-secret-value refresh-token-value client-secret-value"
    for redactor in (store.redactor, global_redactor()):
        assert redactor.redact(text) == "[REDACTED] [REDACTED] [REDACTED] [REDACTED]"


def test_oauth_token_is_unavailable_until_minted_and_after_expiry(tmp_path: Path) -> None:
    (tmp_path / "refresh.token").write_text("refresh-token-value\n")
    store = load_secrets(
        {"google": OAuthSource(oauth=OAUTH)},
        config_dir=tmp_path,
        environ={"G_CLIENT_ID": "cid-value", "G_CLIENT_SECRET": "csecret-value"},
    )
    with pytest.raises(StaleTokenError) as e:
        store.resolve("google")
    assert str(e.value) == "secret 'google': oauth refresh_token has no access token minted yet"
    with pytest.raises(StaleTokenError):
        store.get("google")
    assert store.minted("google") is None

    token = "ya29.minted-access-token-abcdef"
    store.set_minted("google", token, time.time() + 60)
    assert store.resolve("google") == token
    assert store.redactor.redact(token) == "[REDACTED]"
    assert global_redactor().redact(token) == "[REDACTED]"

    store.set_minted("google", token + "-old", time.time() - 1)
    with pytest.raises(StaleTokenError) as e:
        store.resolve("google")
    assert "expired" in str(e.value) and "minted-access" not in str(e.value)
    with pytest.raises(KeyError):
        store.set_minted("nope", token, time.time() + 60)


def test_register_placeholder_is_redacted() -> None:
    store = SecretStore({"x": SecretValue(VALUE)})
    store.register_placeholders(["sk-proj-placeholder-value-123"])
    assert store.redactor.redact("sk-proj-placeholder-value-123") == "[REDACTED]"
    assert store.resolve("x") == VALUE


def test_from_a_real_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "keyward.yaml"
    cfg.write_text(
        textwrap.dedent(
            """\
            version: 1
            secrets:
              openai: { env: OPENAI_API_KEY }
              anthropic: { file: ./secrets/anthropic.key }
              piped: { command: [cat, secrets/anthropic.key], timeout: 60 }
            """
        )
    )
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "anthropic.key").write_text("sk-ant-api03-file-value\n")
    loaded = load_config(cfg)
    store = load_secrets(
        loaded.config.secrets, config_dir=loaded.base_dir, environ={"OPENAI_API_KEY": VALUE}
    )
    assert store.resolve("openai") == VALUE
    assert store.resolve("anthropic") == store.resolve("piped") == "sk-ant-api03-file-value"


def test_keyward_check_reports_missing_secrets_one_line_each(tmp_path: Path) -> None:
    cfg = tmp_path / "keyward.yaml"
    cfg.write_text(
        "version: 1\nsecrets:\n  openai: { env: OPENAI_KEY_T1 }\n"
        "  other: { command: ['false'] }\n  fine: { env: FINE_T1 }\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_KEY_T1",)}
    env["FINE_T1"] = VALUE
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[-3:-1] == [
        "keyward: keyward.yaml:3: secret 'openai': env OPENAI_KEY_T1 is not set",
        "keyward.yaml:4: secret 'other': command false exited with status 1 (its output is not shown)",
    ]
    assert lines[-1].startswith("hint: export OPENAI_KEY_T1 ") and "--skip-secrets" in lines[-1]
    assert VALUE not in proc.stdout + proc.stderr
