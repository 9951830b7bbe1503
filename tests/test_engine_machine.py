"""macOS `podman machine` handling on recorded `podman machine list/inspect --format json`
outputs (Podman 4.x): started once however many callers ask at the same time, socket read
from inspect, stopped by `down --stop-machine` only when nothing else runs."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.engine.machine import (
    ensure_machine_ready,
    parse_list,
    parse_socket,
    stop_machine_if_idle,
)

# `podman machine list --format json`, Podman 4.6 on macOS, stopped default machine
LIST_STOPPED = """[
    {
        "Name": "podman-machine-default",
        "Default": true,
        "Created": "2024-01-09T10:02:11.497468+01:00",
        "Running": false,
        "Starting": false,
        "LastUp": "2024-01-12T17:40:02.312857+01:00",
        "Stream": "default",
        "VMType": "qemu",
        "CPUs": 2,
        "Memory": "2147483648",
        "DiskSize": "107374182400",
        "Port": 50913,
        "RemoteUsername": "core",
        "IdentityPath": "/Users/dev/.ssh/podman-machine-default",
        "UserModeNetworking": true
    },
    {
        "Name": "other",
        "Default": false,
        "Running": true,
        "Starting": false,
        "VMType": "qemu"
    }
]"""
LIST_STARTING = LIST_STOPPED.replace('"Starting": false,\n        "LastUp"', '"Starting": true,\n        "LastUp"')  # fmt: skip
LIST_RUNNING = LIST_STOPPED.replace('"Running": false', '"Running": true', 1)

# `podman machine inspect podman-machine-default` (abridged to the fields Podman 4.6 prints)
INSPECT = """[
     {
          "ConfigPath": {"Path": "/Users/dev/.config/containers/podman/machine/qemu/podman-machine-default.json"},
          "ConnectionInfo": {
               "PodmanSocket": {"Path": "/Users/dev/.local/share/containers/podman/machine/qemu/podman.sock"},
               "PodmanPipe": null
          },
          "Created": "2024-01-09T10:02:11.497468+01:00",
          "Image": {"IgnitionFilePath": {"Path": ""}, "ImageStream": "testing", "ImagePath": {"Path": ""}},
          "LastUp": "2024-01-12T17:40:02.312857+01:00",
          "Name": "podman-machine-default",
          "Resources": {"CPUs": 2, "DiskSize": 100, "Memory": 2048},
          "SSHConfig": {"IdentityPath": "/Users/dev/.ssh/podman-machine-default", "Port": 50913, "RemoteUsername": "core"},
          "State": "running",
          "UserModeNetworking": true,
          "Rootful": false
     }
]"""
SOCKET = "/Users/dev/.local/share/containers/podman/machine/qemu/podman.sock"


class FakePodman:
    """Answers `podman machine ...` from recorded outputs; `start` makes the machine start."""

    def __init__(self, listing: str) -> None:
        self.listing = listing
        self.calls: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        self.polls_until_running = 2

    def __call__(self, args: Sequence[str]) -> str:
        with self.lock:
            self.calls.append(tuple(args))
            verb = args[1]
            if verb == "list":
                if self.listing is LIST_STARTING:
                    self.polls_until_running -= 1
                    if self.polls_until_running <= 0:
                        self.listing = LIST_RUNNING
                return self.listing
            if verb == "start":
                self.listing = LIST_STARTING
                return ""
            if verb == "stop":
                self.listing = LIST_STOPPED
                return ""
            if verb == "inspect":
                return INSPECT
        raise AssertionError(args)

    def count(self, verb: str) -> int:
        return sum(1 for c in self.calls if c[1] == verb)


def test_parse_recorded_outputs() -> None:
    m = parse_list(LIST_STOPPED)
    assert m is not None and (m.name, m.running, m.starting) == (
        "podman-machine-default",
        False,
        False,
    )
    assert parse_list(LIST_RUNNING).running  # type: ignore[union-attr]
    assert parse_list("[]") is None and parse_list("not json") is None
    assert parse_socket(INSPECT) == SOCKET
    assert parse_socket("[]") is None
    one = json.dumps([{"Name": "solo*", "Default": False, "Running": True}])
    assert parse_list(one).name == "solo"  # type: ignore[union-attr]


def test_concurrent_callers_start_the_machine_once(tmp_path: Path) -> None:
    fake = FakePodman(LIST_STOPPED)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(
                ensure_machine_ready(fake, lock_path=tmp_path / "m.lock", sleep=lambda _: None)
            )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert results == [SOCKET] * 8
    assert fake.count("start") == 1


def test_running_machine_is_not_started(tmp_path: Path) -> None:
    fake = FakePodman(LIST_RUNNING)
    assert ensure_machine_ready(fake, lock_path=tmp_path / "m.lock") == SOCKET
    assert fake.count("start") == 0


def test_no_machine_means_no_socket(tmp_path: Path) -> None:
    fake = FakePodman("[]")
    assert ensure_machine_ready(fake, lock_path=tmp_path / "m.lock") is None


def test_machine_that_never_starts_is_an_error(tmp_path: Path) -> None:
    fake = FakePodman(LIST_STOPPED)
    fake.polls_until_running = 10**9
    with pytest.raises(RuntimeError, match="did not start"):
        ensure_machine_ready(fake, lock_path=tmp_path / "m.lock", timeout=3, sleep=lambda _: None)


def test_stop_machine_only_when_nothing_else_runs() -> None:
    fake = FakePodman(LIST_RUNNING)
    assert "2 other container(s)" in stop_machine_if_idle(2, fake)
    assert fake.count("stop") == 0
    assert stop_machine_if_idle(0, fake) == "podman machine podman-machine-default stopped"
    assert fake.count("stop") == 1
    assert "not running" in stop_machine_if_idle(0, fake)
