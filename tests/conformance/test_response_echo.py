"""Response-side reflection: an upstream that holds the real key hands it back to a hostile agent
in every form the agent can decode (compressed bodies it never asked for, the reason phrase,
Range slices, hex/UTF-16/JSON escapes, split SSE data, trailers). Each attack passes when zero
real-key bytes come back, read the way the agent would read them (tests/support/reflections.py).

Explicit mode: the agent runs under `keyward run` and talks raw HTTP/1.1 through the proxy (mitm
plane) and to a service listener (aiohttp plane). Transparent mode: the same agent in a pod
(root), dialling api.example.test directly (mitm plane) and the pod's service listener.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.reflections import leaks, parse, reassemble

# a hostile upstream per plane and mode, every reflection run in module fixtures: minutes
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "tests" / "support" / "raw_agent.py"
HOSTILE = ROOT / "tests" / "support" / "hostile.py"
REAL_KEY = "sk-test-ECHOSECRET-0123456789abcdefXYZ"
API = "203.0.113.10"  # one of the addresses a Topology gives its upstream side
ENCODINGS = ["gzip", "deflate", "rawdeflate", "br", "zstd", "gzip,br", "zstd,gzip,deflate"]
POD_SERVICE_PORT = 18701
RANGE_STEP = 7
RANGE_SPAN = 160

CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
services:
  api: {{ listen: {service_port}, upstream: "https://api.example.test" }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "{target}"
audit:
  path: {audit}
"""


def attacks() -> list[tuple[str, str, dict[str, str]]]:
    """(name, path, extra request headers); Range slices are one attack of many requests."""
    out = [("reason", "/reason", {}), ("forms", "/forms", {}), ("sse", "/sse", {})]
    out += [(f"enc-{e}", f"/enc/{e}", {"Accept-Encoding": "identity"}) for e in ENCODINGS]
    out += [("trailers", "/trailers", {"TE": "trailers"})]
    out += [("unscrubbable", "/enc/compress", {}), ("corrupt", "/enc-corrupt", {})]
    out += [
        (f"range-{a}", "/range", {"Range": f"bytes={a}-{a + RANGE_STEP - 1}"})
        for a in range(0, RANGE_SPAN, RANGE_STEP)
    ]
    return out


@dataclass
class Results:
    """Raw responses per plane and attack name."""

    raw: dict[str, dict[str, bytes]]
    audit: list[dict[str, object]]


def run_agent(argv_prefix: list[str], requests: list[dict], env: dict[str, str], cwd: Path,
              runner: object = None) -> list[bytes]:  # fmt: skip
    payload = json.dumps(requests)
    if runner is not None:
        r = runner([sys.executable, str(AGENT)], input=payload, timeout=300)  # type: ignore[operator]
    else:
        r = subprocess.run([*argv_prefix, sys.executable, str(AGENT)], input=payload, env=env,
                           cwd=cwd, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return [base64.b64decode(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]


def requests_for(plane: str, explicit: bool) -> list[dict]:
    out = []
    for _, path, headers in attacks():
        if plane == "mitm":
            req = {"tls": True, "host": "api.example.test", "port": 443}
            if explicit:
                req["via"] = "proxy"
        elif explicit:  # the service listener
            req = {"tls": False, "host": "127.0.0.1", "port": 0, "via": "service"}
        else:  # the service listener inside the pod
            req = {"tls": False, "host": "127.0.0.1", "port": POD_SERVICE_PORT}
        out.append({**req, "path": path, "headers": headers})
    return out


def start_hostile(directory: Path, argv_prefix: list[str], host: str, tls_port: int,
                  plain_port: int) -> tuple[subprocess.Popen[bytes], dict[str, int]]:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [*argv_prefix, sys.executable, str(HOSTILE), "--dir", str(directory), "--host", host,
         "--names", "api.example.test", "plain.example.test",
         "--tls-port", str(tls_port), "--plain-port", str(plain_port)],
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (directory / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "hostile upstream did not start"
        time.sleep(0.05)
    return proc, json.loads((directory / "ready").read_text())


@pytest.fixture(scope="module")
def explicit() -> Iterator[Results]:
    base = Path(tempfile.mkdtemp(prefix="keyward-echo-"))
    proc, ports = start_hostile(base / "upstream", [], "127.0.0.1", 0, 0)
    try:
        config = base / "keyward.yaml"
        ca = base / "upstream" / "pki" / "test-ca.pem"
        target = f"127.0.0.1:{ports['tls']}"
        audit = base / "audit.jsonl"
        config.write_text(CONFIG.format(ca=ca, target=target, audit=audit, service_port=0))
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env.update(TEST_API_KEY=REAL_KEY, KEYWARD_STATE=str(base / "state"), PYTHONPATH=str(ROOT))
        raw: dict[str, dict[str, bytes]] = {}
        prefix = [sys.executable, "-m", "gateway", "run", "-c", str(config), "--"]
        mitm = run_agent(prefix, requests_for("mitm", True), env, base)
        service = run_agent(prefix, requests_for("service", True), env, base)
        names = [a[0] for a in attacks()]
        raw["mitm"] = dict(zip(names, mitm, strict=True))
        raw["service"] = dict(zip(names, service, strict=True))
        audit_path = base / "audit.jsonl"
        audit = [json.loads(x) for x in audit_path.read_text().splitlines() if x]
        yield Results(raw, audit)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def hostile_pod(
    prefix: str, config_text: Callable[[Path, Path], str], env: dict[str, str]
) -> Iterator[tuple[Any, Path]]:
    """A pod whose upstream side runs the hostile reflector at API (443 and 80), its gateway
    started with `config_text(upstream CA, audit path)` and `env`: (the pod, its base dir; the
    audit is base/audit.jsonl, what the upstream saw base/upstream/seen.jsonl)."""
    from gateway.pod.isolate import IsolatedPod
    from gateway.pod.netns import Topology

    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    up_dir = base / "upstream"
    with Topology() as topo:
        proc, _ = start_hostile(up_dir, topo.upstream.argv([]), API, 443, 80)
        try:
            for p in (up_dir, up_dir / "pki"):
                p.chmod(0o755)
            (up_dir / "pki" / "test-ca.pem").chmod(0o644)
            config = base / "keyward.yaml"
            config.write_text(config_text(up_dir / "pki" / "test-ca.pem", base / "audit.jsonl"))
            pod = IsolatedPod(topo.pod, config, base / "state", work=base / "pod")
            pod.start(env={**os.environ, **env})
            try:
                yield pod, base
            finally:
                pod.stop_gateway()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    shutil.rmtree(base, ignore_errors=True)


def read_audit(base: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (base / "audit.jsonl").read_text().splitlines() if x]


@pytest.fixture(scope="module")
def transparent(root_ok: None) -> Iterator[Results]:
    def config(ca: Path, audit: Path) -> str:
        return CONFIG.format(ca=ca, target=f"{API}:443", audit=audit, service_port=POD_SERVICE_PORT)

    with hostile_pod("keyward-echo-pod-", config, {"TEST_API_KEY": REAL_KEY}) as (pod, base):
        names = [a[0] for a in attacks()]
        raw = {}
        for plane in ("mitm", "service"):
            got = run_agent([], requests_for(plane, False), {}, base, pod.run_agent)
            raw[plane] = dict(zip(names, got, strict=True))
        yield Results(raw, read_audit(base))


@pytest.fixture(params=["explicit", "transparent"])
def results(request: pytest.FixtureRequest) -> Results:
    if request.param == "transparent":
        request.applymarker(pytest.mark.root)
        from tests.conftest import require_root

        require_root()
    return request.getfixturevalue(request.param)


PLANES = ["mitm", "service"]


@pytest.mark.parametrize("plane", PLANES)
def test_reason_phrase_is_the_standard_one(results: Results, plane: str) -> None:
    raw = results.raw[plane]["reason"]
    assert leaks(raw, REAL_KEY) == []
    assert parse(raw).reason == "OK"


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("plane", PLANES)
def test_compressed_reflection_is_decoded_then_scrubbed(
    results: Results, plane: str, encoding: str
) -> None:
    raw = results.raw[plane][f"enc-{encoding}"]
    p = parse(raw)
    assert p.status == 200, raw[:300]
    assert leaks(raw, REAL_KEY) == []
    assert p.header("content-encoding") is None  # forwarded identity-encoded
    assert b"[REDACTED]" in p.body


@pytest.mark.parametrize("plane", PLANES)
def test_undecodable_encoding_is_refused(results: Results, plane: str) -> None:
    raw = results.raw[plane]["unscrubbable"]
    p = parse(raw)
    assert p.status == 502 and p.header("x-keyward-reason") == "unscrubbable-encoding"
    assert leaks(raw, REAL_KEY) == []


@pytest.mark.parametrize("plane", PLANES)
def test_body_that_stops_decoding_is_cut(results: Results, plane: str) -> None:
    """Headers are out when the body turns undecodable: the body never ends well."""
    raw = results.raw[plane]["corrupt"]
    assert leaks(raw, REAL_KEY) == []
    assert not parse(raw).complete
    assert any(r.get("reason") == "undecodable-body" for r in results.audit)


@pytest.mark.parametrize("plane", PLANES)
def test_hex_utf16_and_json_escape_forms(results: Results, plane: str) -> None:
    raw = results.raw[plane]["forms"]
    assert parse(raw).status == 200
    assert leaks(raw, REAL_KEY) == []


@pytest.mark.parametrize("plane", PLANES)
def test_range_slices_do_not_reassemble_the_key(results: Results, plane: str) -> None:
    raws = [v for k, v in results.raw[plane].items() if k.startswith("range-")]
    assert all(parse(r).status == 200 for r in raws)  # Range was not sent upstream
    for r in raws:
        assert leaks(r, REAL_KEY) == []
    assert REAL_KEY.encode() not in reassemble(raws)


@pytest.mark.parametrize("plane", PLANES)
def test_key_split_across_sse_lines_and_events(results: Results, plane: str) -> None:
    raw = results.raw[plane]["sse"]
    p = parse(raw)
    assert p.status == 200 and p.complete
    assert leaks(raw, REAL_KEY) == []
    assert p.body.count(b"data:") >= 4  # every event still arrives


def test_trailers_pass_scrubbed_on_the_mitm_plane(results: Results) -> None:
    raw = results.raw["mitm"]["trailers"]
    p = parse(raw)
    assert p.status == 200 and p.complete, raw[-300:]
    assert p.body == b"body ok\n"
    assert ("X-Echo", "Bearer [REDACTED]") in [(k.title(), v) for k, v in p.trailers]
    assert leaks(raw, REAL_KEY) == []


def test_trailers_are_dropped_on_the_service_plane(results: Results) -> None:
    """aiohttp cannot send trailers: the response completes, the trailer never arrives."""
    raw = results.raw["service"]["trailers"]
    p = parse(raw)
    assert p.status == 200 and p.complete and p.body == b"body ok\n"
    assert p.trailers == [] and leaks(raw, REAL_KEY) == []


def test_no_secret_in_the_audit(results: Results) -> None:
    assert REAL_KEY not in json.dumps(results.audit)
    assert any(r.get("reason") == "unscrubbable-encoding" for r in results.audit)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reflection_results(prefix: list[str], urls: list[str], env: dict[str, str],
                        cwd: Path) -> list[dict[str, object]]:  # fmt: skip
    """The contract check's compressed-reflection attempts, run as the agent."""
    import hashlib

    from gateway.pod.contract import check_script

    script = cwd / "contract_check.py"
    script.write_text(check_script())
    spec = {
        "scan_roots": [],
        "secret_hashes": [
            {"len": len(REAL_KEY), "sha256": hashlib.sha256(REAL_KEY.encode()).hexdigest()}
        ],
        "reflect_urls": urls,
    }
    r = subprocess.run([*prefix, sys.executable, str(script)], input=json.dumps(spec), env=env,
                       cwd=cwd, capture_output=True, text=True, timeout=300)  # fmt: skip
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return [x for x in results if str(x["check"]).startswith("no secret reflected")]


def test_audit_verify_asks_for_compressed_reflections(tmp_path: Path) -> None:
    """`keyward audit verify` asks each credentialed destination for gzip, br and zstd answers
    and decodes them as the agent would: through keyward (both planes) nothing comes back; asked
    of the reflector directly, the gzip reflection is found and the br one cannot be vouched for."""
    proc, ports = start_hostile(tmp_path / "upstream", [], "127.0.0.1", 0, 0)
    try:
        service_port = _free_port()
        config = tmp_path / "keyward.yaml"
        config.write_text(CONFIG.format(
            ca=tmp_path / "upstream" / "pki" / "test-ca.pem", target=f"127.0.0.1:{ports['tls']}",
            audit=tmp_path / "audit.jsonl", service_port=service_port))  # fmt: skip
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env.update(TEST_API_KEY=REAL_KEY, KEYWARD_STATE=str(tmp_path / "state"),
                   PYTHONPATH=str(ROOT))  # fmt: skip
        paths = ["/", "/enc/gzip", "/enc/br", "/enc/zstd"]
        urls = [f"https://api.example.test{p}" for p in paths]
        urls += [f"http://127.0.0.1:{service_port}{p}" for p in paths]
        prefix = [sys.executable, "-m", "gateway", "run", "-c", str(config), "--"]
        guarded = _reflection_results(prefix, urls, env, tmp_path)
        assert len(guarded) == len(urls)
        assert [r for r in guarded if not r["ok"]] == []
        for r in guarded:  # every encoding was asked for and answered
            assert all(f"{e}: 200" in str(r["detail"]) for e in ("gzip", "br", "zstd"))
        direct = f"http://127.0.0.1:{ports['plain']}"
        bare = _reflection_results([], [f"{direct}/enc/gzip?{REAL_KEY}", f"{direct}/enc/br"],
                                   env, tmp_path)  # fmt: skip
        assert [r["ok"] for r in bare] == [False, False]
        assert "a real secret came back" in str(bare[0]["detail"])
        assert "came back br-encoded" in str(bare[1]["detail"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
