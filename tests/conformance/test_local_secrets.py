"""Local secrets: the agent, on the gateway's own machine, tries to read real secrets straight
off it instead of over the network.

Under `keyward run` (cooperative: the child is of the invoking user's uid) a hostile child goes
for its parent, the gateway: `/proc/$PPID/environ`, `/proc/$PPID/mem`, `/proc/$PPID/fd`,
ptrace, fds it may have inherited, and the CA private key in the state dir. Run as root, the
test runs the whole `keyward run` as an unprivileged uid (root could read anything anyway), as
a user would.

Under `sudo keyward run --isolate` (the real command, as a subprocess) the child goes for the
config, `.env`, a 0644 `file:` secret, the state dir and the gateway's control socket; and
`keyward serve` refuses to start while a `file:` secret is readable by the agent's uid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
KEYWARD = [sys.executable, "-m", "gateway"]
REAL_KEY = "sk-test-LOCALSECRET-0123456789abcdefXYZ"
FILE_KEY = "ghp_FILESECRET0123456789abcdefghijklmnop"
USER_UID = 10123  # the unprivileged "invoking user" when the suite runs as root
# The hostile child needs only the standard library: a system python3 that any uid can run
# (a python under /root is reachable only through setpriv's exec, not from a child).
CHILD_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin") or sys.executable

RUN_CONFIG = """version: 1
secrets:
  key: { env: TEST_API_KEY }
egress:
  default: deny
  hosts:
    api.example.test:
      headers: { Authorization: "Bearer {key}" }
placeholders:
  TEST_API_KEY: { secret: key }
audit:
  path: audit.jsonl
"""

# The hostile child. It is given the key reversed (so the key itself is in no argv or
# environment of the gateway) and reports one result per attack: {"leaked": bool, "detail"}.
HOSTILE = r"""
import ctypes, json, os, sys

KEY = sys.argv[1][::-1].encode()
STATE = sys.argv[2]
PPID = os.getppid()
out = {}


def report(name, leaked, detail):
    out[name] = {"leaked": bool(leaked), "detail": detail}


def err(e):
    return f"{type(e).__name__}: {e.strerror or e}"


try:
    with open(f"/proc/{PPID}/cmdline", "rb") as f:
        out["parent"] = f.read().replace(b"\0", b" ").decode(errors="replace")
except OSError as e:
    out["parent"] = err(e)

try:
    with open(f"/proc/{PPID}/environ", "rb") as f:
        data = f.read()
    report("environ", KEY in data, f"read {len(data)} bytes, key {'found' if KEY in data else 'absent'}")
except OSError as e:
    report("environ", False, err(e))

try:
    with open(f"/proc/{PPID}/maps") as f:
        regions = [line.split()[:2] for line in f]
except OSError as e:
    regions, maps_err = [], err(e)
else:
    maps_err = ""
try:
    mem = open(f"/proc/{PPID}/mem", "rb", buffering=0)
except OSError as e:
    report("mem", False, f"open: {err(e)}; maps: {maps_err or 'readable'}")
else:
    found, total = False, 0
    with mem:
        for span, perms in regions:
            if not perms.startswith("r"):
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi - lo > 256 << 20:
                continue
            try:
                mem.seek(lo)
                chunk = mem.read(hi - lo)
            except (OSError, OverflowError, ValueError):
                continue
            total += len(chunk or b"")
            if chunk and KEY in chunk:
                found = True
                break
    report("mem", found or total > 0, f"read {total} bytes of memory, key {'found' if found else 'absent'}")

try:
    fds = os.listdir(f"/proc/{PPID}/fd")
    report("proc_fd", True, f"listed {len(fds)} open fds of the gateway")
except OSError as e:
    report("proc_fd", False, err(e))

inherited = []
for fd in os.listdir("/proc/self/fd"):
    if int(fd) <= 2:
        continue
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue  # the fd of the listing itself, already closed
    if not target.startswith("/proc/"):
        inherited.append(f"{fd} -> {target}")
report("inherited_fds", bool(inherited), ", ".join(inherited) or "only stdin/stdout/stderr")

keys = []
for root in (STATE, os.path.expanduser("~/.local/state/keyward")):
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    blob = f.read(1 << 20)
            except OSError:
                continue
            if b"PRIVATE KEY" in blob or KEY in blob:
                keys.append(path)
report("state_dir", bool(keys), ", ".join(keys) or f"no private key or secret under {STATE}")

# ptrace from a forked process: PTRACE_SEIZE does not stop the gateway, and the tracer's exit
# detaches it again.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    rc = libc.ptrace(0x4206, PPID, None, None)
    os.write(w, json.dumps([rc, ctypes.get_errno()]).encode())
    os._exit(0)
os.close(w)
rc, errno = json.loads(os.read(r, 100))
os.waitpid(pid, 0)
report("ptrace", rc == 0, "attached" if rc == 0 else f"refused: {os.strerror(errno)}")

print(json.dumps(out))
"""


def as_user(uid: int) -> list[str]:
    """Root runs the command as an unprivileged uid (root could read anything anyway)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@pytest.fixture(scope="module")
def run_attacks() -> Iterator[dict[str, object]]:
    """One `keyward run -- hostile-child`, as the invoking user; its report, by attack."""
    base = Path(tempfile.mkdtemp(prefix="keyward-localsecrets-"))
    try:
        config = base / "keyward.yaml"
        config.write_text(RUN_CONFIG)
        script = base / "hostile.py"
        script.write_text(HOSTILE)
        state = base / "state"
        if os.geteuid() == 0:
            for p in (base, config, script):
                os.chown(p, USER_UID, USER_UID)
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env.update(
            TEST_API_KEY=REAL_KEY, KEYWARD_STATE=str(state), HOME=str(base), PYTHONPATH=str(ROOT)
        )
        argv = [*as_user(USER_UID), *KEYWARD, "run", "-c", str(config), "--"]
        argv += [CHILD_PYTHON, str(script), REAL_KEY[::-1], str(state)]
        r = subprocess.run(
            argv, env=env, cwd=base, capture_output=True, text=True, timeout=120, check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert "gateway" in str(report["parent"]), report["parent"]
        report["stderr"] = r.stderr
        yield report
    finally:
        shutil.rmtree(base, ignore_errors=True)


def got_through(report: dict[str, object], attack: str) -> bool:
    result = report[attack]
    assert isinstance(result, dict)
    print(f"{attack}: {result['detail']}")
    return bool(result["leaked"])


def test_run_child_cannot_read_gateway_environ(run_attacks: dict[str, object]) -> None:
    assert not got_through(run_attacks, "environ")


def test_run_child_cannot_read_gateway_memory(run_attacks: dict[str, object]) -> None:
    assert not got_through(run_attacks, "mem")


def test_run_child_cannot_open_gateway_fds(run_attacks: dict[str, object]) -> None:
    assert not got_through(run_attacks, "proc_fd")


def test_run_child_cannot_ptrace_gateway(run_attacks: dict[str, object]) -> None:
    assert not got_through(run_attacks, "ptrace")


def test_run_child_inherits_no_fds(run_attacks: dict[str, object]) -> None:
    assert not got_through(run_attacks, "inherited_fds")


def test_run_child_finds_no_ca_key_in_state_dir(run_attacks: dict[str, object]) -> None:
    assert not got_through(run_attacks, "state_dir")


def test_run_says_once_that_it_is_cooperative(run_attacks: dict[str, object]) -> None:
    stderr = str(run_attacks["stderr"])
    assert stderr.count("cooperative") == 1 and "--isolate" in stderr
    assert REAL_KEY not in stderr


# -- sudo keyward run --isolate: the agent goes for the files --------------------------------

ISOLATE_CONFIG = """version: 1
secrets:
  key: { env: TEST_API_KEY }
  gh: { file: ./secrets/gh.key }
egress:
  default: deny
  hosts:
    api.example.test:
      headers: { Authorization: "Bearer {key}" }
    github.example.test:
      headers: { Authorization: "token {gh}" }
"""

# Reads what a user's project holds, from inside the isolated agent; reports what it got.
HOSTILE_FILES = r"""
import json, os, socket, sys

KEY, FILE_KEY = (a[::-1] for a in sys.argv[1:3])
STATE = sys.argv[3]
out = {"uid": os.getuid(), "cwd": os.getcwd()}


def attempt(path):
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        return {"leaked": False, "detail": f"{type(e).__name__}: {e.strerror}"}
    hit = KEY.encode() in data or FILE_KEY.encode() in data or b"secrets:" in data
    return {"leaked": hit or bool(data), "detail": f"read {len(data)} bytes"}


out["config"] = attempt("keyward.yaml")
out["dotenv"] = attempt(".env")
out["secret_file"] = attempt(os.path.join("secrets", "gh.key"))
try:
    entries = sorted(os.listdir(STATE))
    found = []
    for dirpath, _dirs, files in os.walk(STATE):
        for name in files:
            found.append(os.path.join(dirpath, name))
    out["state_dir"] = {"leaked": bool(entries), "detail": f"listed {entries}, files {found}"}
except OSError as e:
    out["state_dir"] = {"leaked": False, "detail": f"{type(e).__name__}: {e.strerror}"}
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(os.path.join(STATE, "control", "keyward.sock"))
    out["control_socket"] = {"leaked": True, "detail": "connected"}
except OSError as e:
    out["control_socket"] = {"leaked": False, "detail": f"{type(e).__name__}: {e.strerror}"}
finally:
    sock.close()
with open("made-by-agent.txt", "w") as f:
    f.write("the workspace is usable\n")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def isolate_attacks(root_ok: None) -> Iterator[dict[str, object]]:
    """`sudo keyward run --isolate` as a user types it in their project (a 0700 home, the
    config, a 0600 .env, a 0644 secret file), with a hostile CMD; its report, by attack."""
    base = Path(tempfile.mkdtemp(prefix="keyward-isolate-secrets-"))
    base.chmod(0o755)
    try:
        home = base / "home" / "user"
        project = home / "project"
        (project / "secrets").mkdir(parents=True)
        (project / "keyward.yaml").write_text(ISOLATE_CONFIG)
        (project / ".env").write_text(f"TEST_API_KEY={REAL_KEY}\n")
        (project / ".env").chmod(0o600)
        (project / "secrets" / "gh.key").write_text(FILE_KEY + "\n")
        (project / "secrets" / "gh.key").chmod(0o644)  # the default umask's mode
        for p in (home, *home.rglob("*")):
            os.chown(p, USER_UID, USER_UID)
        home.chmod(0o700)
        script = base / "hostile.py"
        script.write_text(HOSTILE_FILES)
        script.chmod(0o644)
        state = base / "state"
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env.update(SUDO_UID=str(USER_UID), SUDO_GID=str(USER_UID), PYTHONPATH=str(ROOT))
        env.pop("KEYWARD_STATE", None)
        argv = [*KEYWARD, "run", "--isolate", "--state", str(state), "--"]
        argv += [CHILD_PYTHON, str(script), REAL_KEY[::-1], FILE_KEY[::-1], str(state)]
        r = subprocess.run(
            argv, env=env, cwd=project, capture_output=True, text=True, timeout=180, check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        made = project / "made-by-agent.txt"
        report["made"] = [made.stat().st_uid, made.stat().st_gid] if made.exists() else None
        report["stderr"] = r.stderr
        yield report
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_isolate_agent_cannot_read_the_config(isolate_attacks: dict[str, object]) -> None:
    assert not got_through(isolate_attacks, "config")


def test_isolate_agent_cannot_read_dotenv(isolate_attacks: dict[str, object]) -> None:
    assert not got_through(isolate_attacks, "dotenv")


def test_isolate_agent_cannot_read_a_0644_secret_file(isolate_attacks: dict[str, object]) -> None:
    assert not got_through(isolate_attacks, "secret_file")


def test_isolate_agent_cannot_read_the_state_dir(isolate_attacks: dict[str, object]) -> None:
    assert not got_through(isolate_attacks, "state_dir")


def test_isolate_agent_cannot_reach_the_control_socket(isolate_attacks: dict[str, object]) -> None:
    assert not got_through(isolate_attacks, "control_socket")


def test_isolate_agent_is_a_dedicated_uid_that_can_edit_the_workspace(
    isolate_attacks: dict[str, object],
) -> None:
    """The user owns the config and secrets: CMD is not them, yet edits their project, and
    what it writes is theirs on disk."""
    assert isolate_attacks["uid"] not in (0, USER_UID)
    assert isolate_attacks["made"] == [USER_UID, USER_UID]
    assert str(isolate_attacks["cwd"]).endswith("/home/user/project")
    assert "dedicated uid" in str(isolate_attacks["stderr"])


# -- keyward serve: a secret file the agent's uid could read ---------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any uid can enter (pytest's own are under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="keyward-serve-secrets-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_serve_refuses_a_secret_file_the_agent_can_read(open_dir: Path) -> None:
    """A 0644 `file:` secret (the default umask's mode) and an agent sharing the filesystem:
    serve does not start, and says which file without printing what is in it."""
    tmp_path = open_dir
    secret = tmp_path / "gh.key"
    secret.write_text(FILE_KEY + "\n")
    secret.chmod(0o644)
    config = tmp_path / "keyward.yaml"
    config.write_text(ISOLATE_CONFIG.replace("./secrets/gh.key", str(secret)))
    (tmp_path / ".env").write_text(f"TEST_API_KEY={REAL_KEY}\n")
    (tmp_path / ".env").chmod(0o600)
    argv = [*KEYWARD, "serve", "-c", str(config), "--no-netfilter", "--state",
            str(tmp_path / "state"), "--agent-uid", str(USER_UID + 1)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"file {secret} is readable by the agent's uid {USER_UID + 1}" in r.stderr
    assert "chmod 600" in r.stderr and str(tmp_path / ".env") not in r.stderr
    assert FILE_KEY not in r.stderr + r.stdout and REAL_KEY not in r.stderr + r.stdout
