"""macOS `podman machine`: made ready once before use, stopped only when nothing else runs.

Several keyward commands may start at once (a script bringing up three pairs): the machine is
started by one of them only (a process lock plus a file lock across processes), the others wait
for it and then read its socket. Every answer comes from `podman machine list/inspect --format
json`, parsed here without I/O so it is tested on recorded outputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runs `podman ARGS...` and returns its stdout (raises RuntimeError on failure).
Runner = Callable[[Sequence[str]], str]
START_TIMEOUT = 300.0
_PROCESS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Machine:
    name: str
    running: bool
    starting: bool


def parse_list(text: str) -> Machine | None:
    """The default machine from `podman machine list --format json` (or the only one)."""
    try:
        data: Any = json.loads(text or "[]")
    except ValueError:
        return None
    machines = [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    chosen = next((m for m in machines if m.get("Default")), None)
    if chosen is None and len(machines) == 1:
        chosen = machines[0]
    if chosen is None:
        return None
    return Machine(
        name=str(chosen.get("Name", "")).rstrip("*"),
        running=bool(chosen.get("Running")),
        starting=bool(chosen.get("Starting")),
    )


def parse_socket(text: str) -> str | None:
    """The API socket path from `podman machine inspect` (a JSON list of machines)."""
    try:
        data: Any = json.loads(text or "[]")
    except ValueError:
        return None
    for m in data if isinstance(data, list) else [data]:
        if not isinstance(m, dict):
            continue
        path = ((m.get("ConnectionInfo") or {}).get("PodmanSocket") or {}).get("Path")
        if path:
            return str(path)
    return None


def run_podman(args: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=START_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise RuntimeError("podman is not installed") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"podman {' '.join(args)} timed out") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"podman {' '.join(args)} failed: {lines[-1] if lines else '?'}")
    return done.stdout


def default_lock_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keyward" / "podman-machine.lock"


@contextlib.contextmanager
def _single_flight(lock_path: Path) -> Iterator[None]:
    """One starter per process and per user: a thread lock, then an flock on a file."""
    with _PROCESS_LOCK:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def ensure_machine_ready(
    run: Runner = run_podman,
    *,
    lock_path: Path | None = None,
    timeout: float = START_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Start the default machine if it is not running (once, whoever else asks at the same
    time), wait until it runs, and return its API socket path; None when there is no machine."""
    with _single_flight(lock_path or default_lock_path()):
        machine = parse_list(run(["machine", "list", "--format", "json"]))
        if machine is None:
            return None
        if not machine.running:
            if not machine.starting:
                run(["machine", "start", machine.name])
            waited = 0.0
            while True:
                machine = parse_list(run(["machine", "list", "--format", "json"]))
                if machine is None or machine.running:
                    break
                if waited > timeout:
                    raise RuntimeError(f"podman machine did not start within {timeout:.0f}s")
                sleep(1.0)
                waited += 1.0
            if machine is None:
                return None
        return parse_socket(run(["machine", "inspect", machine.name]))


def stop_machine_if_idle(running_containers: int, run: Runner = run_podman) -> str:
    """`down --stop-machine`: stop the default machine unless any container still runs in it.
    Returns what was done, as a sentence."""
    machine = parse_list(run(["machine", "list", "--format", "json"]))
    if machine is None:
        return "no podman machine"
    if not machine.running:
        return f"podman machine {machine.name} is not running"
    if running_containers:
        return (
            f"podman machine {machine.name} left running: {running_containers} other "
            "container(s) still run in it"
        )
    run(["machine", "stop", machine.name])
    return f"podman machine {machine.name} stopped"


def machine_socket_text() -> str:
    """For discovery on macOS: the ready machine's socket path, or empty."""
    return ensure_machine_ready() or ""
