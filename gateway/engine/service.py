"""Transport fallback: Podman is installed but no API socket answers (the usual rootless set-up
without `podman.socket`). keyward then runs `podman system service` itself, on a private socket
in a 0700 directory, for the command's lifetime (or longer with `--keep`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 20.0
SOCKET_NAME = "podman.sock"


class ServiceError(RuntimeError):
    """podman is missing, or its API service did not come up."""


@dataclass
class PrivateService:
    """A `podman system service` keyward started; `stop()` ends it and removes its directory."""

    process: subprocess.Popen[bytes]
    socket_path: Path
    keep: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.keep:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)


def start_private_service(
    probe: Callable[[Path], str | None] | None = None,
    podman: str | None = None,
    timeout: float = START_TIMEOUT,
) -> PrivateService:
    """Start `podman system service --time=0` on a fresh private socket and wait until it
    answers `/_ping` (`probe(path)` returns why not, or None)."""
    from gateway.engine.discovery import probe_socket

    check = probe or probe_socket
    exe = podman or shutil.which("podman")
    if exe is None:
        raise ServiceError("podman is not installed")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else None
    directory = Path(tempfile.mkdtemp(prefix="keyward-podman-", dir=base))  # 0700
    sock = directory / SOCKET_NAME
    log = directory / "service.log"
    with log.open("wb") as log_file:  # a file, not a pipe: podman must never block on it
        proc = subprocess.Popen(
            [exe, "system", "service", "--time=0", f"unix://{sock}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # a Ctrl-C meant for keyward is not delivered to it twice
        )
    service = PrivateService(proc, sock)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if proc.poll() is not None:
            err = log.read_text(errors="replace").strip()
            service.stop()
            raise ServiceError(f"podman system service exited ({proc.returncode}): {err[-300:]}")
        why = check(sock)
        if why is None:
            return service
        if time.monotonic() > deadline:
            service.stop()
            raise ServiceError(f"podman system service did not answer within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
