"""The container configs `keyward up` sends to the engine, and the config shipped to the gateway:
hardening options present, secrets only in the gateway's `.env`, never in the agent or an argv."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from gateway.config.loader import load_config
from gateway.credentials.rewrite import secret_key as secret_env_name
from gateway.credentials.sources import load_secrets, read_dotenv
from gateway.errors import ConfigError, PairError
from gateway.pair.spec import (
    AGENT_TRUST,
    GATEWAY_CAPS,
    GW_UPSTREAM_CA,
    LABEL_PAIR,
    PairNames,
    PairOptions,
    agent_config,
    build_gateway_bundle,
    check_pair_name,
    dotenv_text,
    gateway_config,
    holder_config,
    parse_trust_env,
)
from gateway.pair.verify import build_spec, reflect_urls, resolve_targets
from tests.support.pki import make_ca

REAL = "sk-test-REALVALUE-0123456789abcdef"
FILE_SECRET = 'file-secret-with "quotes" $dollar \\slash'
CLIENT_SECRET = "oauth-client-secret-XYZ-0987654321"
REFRESH = "oauth-refresh-token-ABC-1234567890"

CONFIG = """version: 1
secrets:
  key: { env: PAIRTEST_KEY }
  other-key: { file: ./other.key }
  google:
    oauth:
      token_url: https://oauth.example.test/token
      grant: refresh_token
      client_id: { env: PAIRTEST_CLIENT_ID }
      client_secret: { env: PAIRTEST_CLIENT_SECRET }
      refresh_token: { command: [cat, refresh.txt] }
egress:
  default: deny
  hosts:
    api.example.test:
      headers: { Authorization: "Bearer {key}", X-Other: "{other-key}" }
    "*.googleapis.example.test":
      headers: { Authorization: "Bearer {google}" }
placeholders:
  PAIRTEST_KEY: { secret: key }
services:
  api: { listen: 8701, upstream: https://api.example.test }
upstream:
  ca_bundle: ./corp-ca.pem
  resolve: { "api.example.test:443": "198.51.100.7:443" }
"""

ALL_SECRETS = (REAL, FILE_SECRET, CLIENT_SECRET, REFRESH)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "keyward.yaml").write_text(CONFIG)
    (tmp_path / "other.key").write_text(FILE_SECRET + "\n")
    (tmp_path / "other.key").chmod(0o600)
    (tmp_path / "refresh.txt").write_text(REFRESH)
    (tmp_path / "corp-ca.pem").write_bytes(make_ca(tmp_path / "pki").path.read_bytes())
    monkeypatch.setenv("PAIRTEST_KEY", REAL)
    monkeypatch.setenv("PAIRTEST_CLIENT_ID", "client-id-public")
    monkeypatch.setenv("PAIRTEST_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "keyward.yaml"


def _bundle(cfg: Path):  # type: ignore[no-untyped-def]
    loaded = load_config(cfg)
    store = load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)
    return build_gateway_bundle(loaded, store)


def opts(**kw: object) -> PairOptions:
    base: dict[str, object] = {"name": "t1", "labels": {"keyward.test": "1"}}
    base.update(kw)
    return PairOptions(**base)  # type: ignore[arg-type]


def test_names_and_labels() -> None:
    n = PairNames("dev")
    assert (n.gateway, n.agent) == ("keyward-dev-gateway", "keyward-dev-agent")
    assert (n.state_volume, n.trust_volume) == ("keyward-dev-state", "keyward-dev-trust")
    assert n.holder == "keyward-dev-pod"
    o = opts()
    bodies = (holder_config(o), gateway_config(o, "hid"), agent_config(o, "hid", []))
    for body, role in zip(bodies, ("holder", "gateway", "agent"), strict=True):
        assert body["Labels"][LABEL_PAIR] == "t1"
        assert body["Labels"]["keyward.test"] == "1"
        assert body["Labels"]["keyward.role"] == role


@pytest.mark.parametrize("bad", ["", "UPPER", "has space", "../x", "a" * 60])
def test_bad_pair_names_refused(bad: str) -> None:
    with pytest.raises(PairError):
        check_pair_name(bad)


def test_gateway_hardening() -> None:
    body = gateway_config(opts(), "hid")
    host = body["HostConfig"]
    assert host["NetworkMode"] == "container:hid"
    assert host["CapDrop"] == ["ALL"]
    assert set(host["CapAdd"]) == set(GATEWAY_CAPS)
    assert not {"SYS_ADMIN", "NET_RAW", "SYS_PTRACE", "ALL"} & set(host["CapAdd"])
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True
    assert "/tmp" in host["Tmpfs"]
    assert host["PidsLimit"] > 0 and host["Memory"] > 0
    assert host.get("Privileged") is not True
    assert body["User"] == "0:0"  # serve drops itself after applying rules
    cmd = body["Cmd"]
    assert cmd[0] == "serve" and "--ready-file" in cmd and "--trust-dir" in cmd
    assert "ExposedPorts" not in body


def test_holder_owns_the_namespace_and_does_nothing() -> None:
    o = opts(extra_hosts=["db.example.test:198.51.100.9"], dns=["192.0.2.53"])
    body = holder_config(o, kind="podman")
    host = body["HostConfig"]
    assert host["ExtraHosts"] == ["db.example.test:198.51.100.9"]
    assert host["Dns"] == ["192.0.2.53"]
    assert body["Entrypoint"] == ["sleep", "infinity"] and body["User"] == "65534:65534"
    assert host["CapDrop"] == ["ALL"] and "CapAdd" not in host and host["ReadonlyRootfs"]
    assert host["RestartPolicy"] == {"Name": "always"}  # podman-restart.service starts these
    assert holder_config(o)["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}
    for member in (gateway_config(o, "h"), agent_config(o, "h", [])):
        for key in ("ExtraHosts", "Dns", "PortBindings", "NetworkingConfig"):
            assert key not in member["HostConfig"] and key not in member


def test_holder_networks_and_published_services() -> None:
    body = holder_config(opts(networks=["net-a", "net-b"], publish_services=True), [8701])
    assert body["HostConfig"]["NetworkMode"] == "net-a"
    assert list(body["NetworkingConfig"]["EndpointsConfig"]) == ["net-a"]
    assert body["HostConfig"]["PortBindings"] == {
        "8701/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8701"}]
    }


def test_agent_hardening_and_namespace(tmp_path: Path) -> None:
    trust = ["SSL_CERT_FILE=/etc/keyward/ca-bundle.crt", "PAIRTEST_KEY=sk-fake-placeholder"]
    body = agent_config(opts(workspace=tmp_path, agent_read_only=True), "abc123", trust)
    host = body["HostConfig"]
    assert host["NetworkMode"] == "container:abc123"
    assert host["CapDrop"] == ["ALL"] and "CapAdd" not in host
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"]
    assert host["PidsLimit"] > 0
    assert body["User"] == "1000:1000"
    assert body["Env"] == trust
    assert f"keyward-t1-trust:{AGENT_TRUST}:ro" in host["Binds"]
    assert f"{tmp_path.resolve()}:/workspace:rw" in host["Binds"]
    assert not any("state" in b or "config" in b for b in host["Binds"])
    # joiners may not set these: they belong on the gateway
    for key in ("ExtraHosts", "Dns", "PortBindings"):
        assert key not in host
    assert "Hostname" not in body
    # the command runs behind the guard that waits for the gateway's stamp
    argv = body["Entrypoint"] + body["Cmd"]
    assert argv[:2] == ["/bin/sh", "-c"] and "readlink /proc/self/ns/net" in argv[2]
    assert argv[4] == f"{AGENT_TRUST}/ready"
    assert argv[-3:] == ["sh", "-c", "while :; do sleep 3600; done"]
    assert agent_config(opts(command=["claude"]), "x", [])["Cmd"][-1] == "claude"


def test_parse_trust_env() -> None:
    assert parse_trust_env("# c\nA=1\n\nB=x=y\nnot a line\n") == ["A=1", "B=x=y"]


def test_bundle_moves_every_secret_to_dotenv(cfg: Path, tmp_path: Path) -> None:
    bundle = _bundle(cfg)
    names = set(bundle.files)
    assert names == {"keyward.yaml", ".env", "upstream-ca.pem"}
    text = bundle.files["keyward.yaml"][0].decode()
    for secret in ALL_SECRETS:
        assert secret not in text
    assert bundle.files[".env"][1] == 0o600
    env = bundle.files[".env"][0].decode()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".env").write_text(env)
    values = read_dotenv(out / ".env")
    assert values[secret_env_name("key")] == REAL
    assert values[secret_env_name("other-key")] == FILE_SECRET
    assert values[secret_env_name("google", "client_secret")] == CLIENT_SECRET
    assert values[secret_env_name("google", "refresh_token")] == REFRESH
    assert "command" not in text and "other.key" not in text
    assert GW_UPSTREAM_CA in text
    assert bundle.service_ports == (8701,)


def test_bundle_tar_modes(cfg: Path) -> None:
    bundle = _bundle(cfg)
    with tarfile.open(fileobj=io.BytesIO(bundle.tar())) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members[".env"].mode == 0o600 and members[".env"].uid == 0
    assert members["keyward.yaml"].mode == 0o644


def test_secrets_never_in_container_configs(cfg: Path, tmp_path: Path) -> None:
    bundle = _bundle(cfg)
    o = opts(workspace=tmp_path, command=["sh", "-c", "env"])
    blob = json.dumps(
        [
            holder_config(o, bundle.service_ports),
            gateway_config(o, "h"),
            agent_config(o, "h", ["A=b"]),
        ]
    )
    for secret in ALL_SECRETS:
        assert secret not in blob


def test_dotenv_round_trip(tmp_path: Path) -> None:
    values = {"A": 'x"y', "B": "a\\b$c d #e", "C": "'single'"}
    (tmp_path / ".env").write_text(dotenv_text(values))
    assert read_dotenv(tmp_path / ".env") == values


def test_missing_ca_bundle_is_an_error(cfg: Path) -> None:
    (cfg.parent / "corp-ca.pem").unlink()
    with pytest.raises((PairError, ConfigError), match="ca_bundle"):
        _bundle(cfg)


def test_verify_spec_has_hashes_only(cfg: Path) -> None:
    loaded = load_config(cfg)
    store = load_secrets(loaded.config.secrets, config_dir=loaded.base_dir)
    facts = {"secret_hashes": [{"len": 3, "sha256": "ab"}], "ca_key_line_sha256": "cd"}
    targets = resolve_targets(cfg.read_text())
    assert targets == [("198.51.100.7", 443)]
    spec = build_spec(facts, targets, store)
    blob = json.dumps(spec)
    for secret in ALL_SECRETS:
        assert secret not in blob
    assert {"len": 3, "sha256": "ab"} in spec["secret_hashes"]
    assert len(spec["secret_hashes"]) >= 3
    assert spec["ca_key_line_sha256"] == "cd"
    assert ["198.51.100.7", 9999] in spec["direct_tcp"]
    assert ["192.0.2.1", 443] in spec["direct_tcp"]
    assert spec["scan_roots"] == ["/workspace", "/home", "/etc", "/tmp"]
    assert "/run/podman/podman.sock" in spec["unix_sockets"]
    assert spec["reflect_urls"] == []  # none asked for


def test_verify_asks_credentialed_hosts_and_services_for_reflections(cfg: Path) -> None:
    """Named hosts that get a credential and service listeners; a wildcard has no one name."""
    urls = reflect_urls(cfg.read_text())
    assert urls == ["https://api.example.test/", "http://127.0.0.1:8701/"]
    facts = {"secret_hashes": [], "ca_key_line_sha256": "cd"}
    assert build_spec(facts, [], None, urls)["reflect_urls"] == urls


def test_up_fails_on_a_missing_secret_before_touching_the_engine(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.main import main

    monkeypatch.delenv("PAIRTEST_KEY")
    rc = main(["up", "-c", str(cfg), "--name", "t1", "--engine-socket", "/nonexistent.sock"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "PAIRTEST_KEY" in err and "nonexistent" not in err


class _FakeImages:
    def __init__(self, pull_error: Exception | None = None) -> None:
        self.pulled: list[str] = []
        self.pull_error = pull_error

    async def image_inspect(self, ref: str) -> dict[str, str]:
        from gateway.engine.errors import NotFound

        raise NotFound(404, f"no such image {ref}")

    async def image_pull(self, ref: str, *, progress: object = None) -> list[object]:
        if self.pull_error is not None:
            raise self.pull_error
        self.pulled.append(ref)
        if callable(progress):
            progress({"status": "Downloading", "progress": "[==>  ]"})
        return []


async def test_missing_image_is_pulled_with_progress() -> None:
    from gateway.pair.lifecycle import ensure_image

    fake = _FakeImages()
    lines: list[str] = []
    await ensure_image(fake, "example.test/agent:1", lines.append)  # type: ignore[arg-type]
    assert fake.pulled == ["example.test/agent:1"]
    assert lines and "Downloading" in lines[0]


async def test_missing_local_image_names_the_build_script() -> None:
    from gateway.engine.errors import EngineError
    from gateway.pair.lifecycle import ensure_image

    with pytest.raises(PairError, match="build-images"):
        await ensure_image(_FakeImages(), "localhost/keyward-agent:dev")  # type: ignore[arg-type]
    failing = _FakeImages(EngineError(0, "registry unreachable"))
    with pytest.raises(PairError, match="could not be pulled"):
        await ensure_image(failing, "example.test/agent:1")  # type: ignore[arg-type]


def test_engine_errors_become_one_sentence_that_says_what_to_do() -> None:
    from gateway.cli.pair_cmds import engine_advice
    from gateway.engine.errors import Conflict, EngineUnavailable, NotFound, ServerError

    stopped = engine_advice(Conflict(409, "container 4f2a is not running"), "foo")
    assert "keyward restart --name foo" in stopped and "not running" in stopped
    podman = engine_advice(
        ServerError(
            500, "can only create exec sessions on running containers: container state improper"
        ),
        "foo",
    )
    assert "keyward restart --name foo" in podman
    gone = engine_advice(NotFound(404, "no such container: 4f2a"), "default")
    assert "keyward up" in gone and "--name" not in gone
    dead = engine_advice(EngineUnavailable(0, "/run/x.sock: refused"), "foo")
    assert "keyward engine" in dead
    other = engine_advice(ServerError(500, "runc failed\nlots of detail"), "foo")
    for msg in (stopped, gone, dead, other):
        assert "\n" not in msg


def test_agent_guard_runs_only_with_this_namespaces_stamp(tmp_path: Path) -> None:
    """The agent-side wait: a stamp from another namespace (engine restart) is not "ready"."""
    import os
    import subprocess

    from gateway.pair.spec import AGENT_GUARD

    ready = tmp_path / "ready"

    def guard(waits: int) -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", AGENT_GUARD, "g", str(ready), str(waits), "echo", "ran"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    missing = guard(0)
    assert (
        missing.returncode == 124 and "not ready" in missing.stderr and "ran" not in missing.stdout
    )
    import secrets
    import socket

    me = os.readlink("/proc/self/ns/net")
    name = f"keyward-ready-test-{secrets.token_hex(6)}"
    ready.write_text(f"net:[1] @{name}\n")  # an earlier namespace
    assert guard(1).returncode == 124
    ready.write_text(f"{me} @{name}\n")  # this namespace, but no gateway holds the socket
    assert guard(0).returncode == 124
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.bind("\0" + name)
        ok = guard(0)
    assert ok.returncode == 0 and ok.stdout == "ran\n"


def _podman_info(version: str, rootless: bool, cgroup: str, controllers: list[str]) -> dict:  # type: ignore[type-arg]
    return {
        "host": {
            "security": {"rootless": rootless},
            "cgroupVersion": cgroup,
            "cgroupControllers": controllers,
        },
        "version": {"Version": version},
    }


def test_user_namespace_and_unapplied_limits_per_engine() -> None:
    from gateway.pair.spec import engine_user_setup

    o = opts()
    # rootless Podman on cgroup v1 (what this kind of machine has): keep-id, limits reported
    userns, notes = engine_user_setup("podman", _podman_info("4.3.1", True, "v1", []), o)
    assert userns == "keep-id"
    assert len(notes) == 2 and "memory limit (rootless on cgroup v1)" in notes[0]
    assert "pids limit" in notes[1] and "gateway and agent" in notes[1]
    # rootful Podman 4.3 has no keep-id (rootful needs 4.5): plain uid:gid, nothing dropped
    full = ["cpu", "memory", "pids"]
    assert engine_user_setup("podman", _podman_info("4.3.1", False, "v1", full), o) == (None, [])
    assert engine_user_setup("podman", _podman_info("4.5.0", False, "v2", full), o)[0] == "keep-id"
    # rootless on cgroup v2 without delegated pids
    _, notes = engine_user_setup("podman", _podman_info("5.0.1", True, "v2", ["memory"]), o)
    assert len(notes) == 1 and "pids" in notes[0]
    # Docker says which limits its kernel supports
    assert engine_user_setup("docker", {"MemoryLimit": True, "PidsLimit": True}, o) == (None, [])
    _, notes = engine_user_setup("docker", {"MemoryLimit": False, "PidsLimit": True}, o)
    assert len(notes) == 1 and "memory" in notes[0]
    # keep-id is the holder's: the gateway and the agent join its user namespace, which owns the
    # network namespace (mounting /sys and iptables' owner match need that)
    keep = opts(userns="keep-id")
    assert holder_config(keep)["HostConfig"]["UsernsMode"] == "keep-id"
    assert agent_config(keep, "h", [])["HostConfig"]["UsernsMode"] == "container:h"
    assert gateway_config(keep, "h")["HostConfig"]["UsernsMode"] == "container:h"
    plain = opts()
    for body in (holder_config(plain), agent_config(plain, "h", []), gateway_config(plain, "h")):
        assert "UsernsMode" not in body["HostConfig"]


def test_default_agent_user_is_the_invoking_user() -> None:
    from gateway.pair.spec import default_agent_user

    assert default_agent_user({}, 1234, 567) == "1234:567"
    assert default_agent_user({"SUDO_UID": "1234", "SUDO_GID": "567"}, 0, 0) == "1234:567"
    assert default_agent_user({}, 0, 0) == "1000:1000"
    assert default_agent_user({"SUDO_UID": "0", "SUDO_GID": "0"}, 0, 0) == "1000:1000"


def test_host_gateway_names_map_only_rules_that_name_them() -> None:
    from gateway.pair.spec import host_gateway_resolve

    rules = ["api.example.test", "host.docker.internal:11434", "host.containers.internal"]
    got = host_gateway_resolve(rules, {"host.containers.internal:443": "192.0.2.9:443"}, "10.1.0.1")
    assert got == {
        "host.docker.internal:11434": "10.1.0.1:11434",
        "host.containers.internal:80": "10.1.0.1:80",
    }
    assert host_gateway_resolve(["api.example.test"], {}, "10.1.0.1") == {}


def test_bundle_maps_the_host_gateway_for_the_gateway(cfg: Path) -> None:
    text = cfg.read_text().replace(
        "egress:\n  default: deny\n  hosts:\n",
        'egress:\n  default: deny\n  hosts:\n    "host.docker.internal:11434": {}\n',
    )
    cfg.write_text(text)
    loaded = load_config(cfg)
    store = load_secrets(loaded.config.secrets, config_dir=cfg.parent)
    bundle = build_gateway_bundle(loaded, store, host_gateway="10.89.0.1")
    shipped = bundle.files["keyward.yaml"][0].decode()
    assert "host.docker.internal:11434: 10.89.0.1:11434" in shipped
    assert "api.example.test:443: 198.51.100.7:443" in shipped
