"""Request-side wire attacks (DESIGN §7.1, §7.2, §7.5) and the worlds they are tried in.

Every attack is hand-made bytes (or HTTP/2 frames) sent by `attack_client.py` as the agent,
once per plane and mode. The upstream's own record of what it received decides the outcome:
- `/atk/<name>` reaches the upstream only if the attack says the request may be decided and
  allowed (then with the verified Host and one audit record);
- `/admin/smuggled-<name>` (a `DELETE` the policy denies) never reaches it, whatever happens;
- a refused attack gets one of the statuses it lists.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.h2upstream import H2Upstream
from tests.support.pki import make_ca
from tests.support.upstream import Upstream, start_in_namespace
from tests.support.world import KEYWARD, REAL_KEY, ROOT

CLIENT = Path(__file__).with_name("attack_client.py")
API = "api.example.test"
H2 = "h2.example.test"
PLAIN = "plain.example.test"
REFUSED = (400, 403, 414, 431)


@dataclass(frozen=True)
class Attack:
    """One attempt. `raw` parts are sent in order on one connection (HTTP/1.1), or `h2`
    headers and body on one stream. `expect`: statuses the first response may have;
    `reach`: whether `/atk/<name>` may reach the upstream (decided and allowed)."""

    name: str
    kind: str  # authority | framing | limits
    raw: tuple[str, ...] = ()
    h2: tuple[tuple[str, str], ...] = ()
    body: str = ""
    expect: tuple[int, ...] = REFUSED
    reach: bool = False
    reason: str | None = None
    sni: str | None = None
    planes: tuple[str, ...] = ("mitm", "service")

    def spec(self, plane: str, target: tuple[str, int], tls: bool) -> dict[str, Any]:
        host, port = target
        out: dict[str, Any] = {"name": f"{plane}:{self.name}", "host": host, "port": port}
        out["tls"] = tls
        out["tunnel"] = plane == "mitm"
        if self.sni:
            out["sni"] = self.sni
        tag = _tagger(plane)
        if plane == "mitm-plain":  # the same bytes, addressed to the plain-HTTP name
            tag = lambda t, inner=tag: _readdress(inner(t))  # noqa: E731
        if self.h2:
            headers = [(k, tag(v)) for k, v in self.h2]
            out.update(h2=True, headers=headers, body=tag(self.body))
        else:
            out["raw"] = [tag(r) for r in self.raw]
        return out


def _readdress(part: str) -> str:
    """The head of a part addressed to the plain-HTTP name (bodies keep their lengths)."""
    cut = part.find("\r\n\r\n")
    cut = len(part) if cut < 0 else cut
    head = part[:cut].replace(API, PLAIN).replace(API.upper(), PLAIN)
    return head + part[cut:]


def _tagger(plane: str) -> Callable[[str], str]:
    """Request lines carry the plane, so each plane's attempt is told apart at the one
    upstream (bodies are left alone: their lengths are part of the attack)."""
    return lambda text: text.replace("/atk/", f"/atk/{plane}/")


def req(method: str, target: str, *headers: str, body: str = "", host: str | None = API) -> str:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += list(headers)
    return "\r\n".join(lines) + "\r\n\r\n" + body


def smuggled(name: str) -> str:
    return req("DELETE", f"/admin/smuggled-{name}", "Connection: close")


def chunked(data: str) -> str:
    return f"{len(data):x}\r\n{data}\r\n0\r\n\r\n"


def _attacks() -> list[Attack]:
    a: list[Attack] = []
    close = "Connection: close"

    def add(name: str, kind: str, *raw: str, **kw: Any) -> None:
        a.append(Attack(name, kind, raw=raw, **kw))

    # -- authority: the client names a destination other than the verified one ---------
    mm = "authority-mismatch"
    add("absolute-form-other-host", "authority",
        req("GET", "https://evil.example.test/atk/absolute-form-other-host", close),
        expect=(403,), reason=mm)  # fmt: skip
    add("absolute-form-same-host", "authority",
        req("GET", f"https://{API}/atk/absolute-form-same-host", close), expect=(403,), reason=mm)  # fmt: skip
    add("absolute-form-http-scheme", "authority",
        req("GET", "http://evil.example.test/atk/absolute-form-http-scheme", close),
        expect=(403,), reason=mm)  # fmt: skip
    add("absolute-form-userinfo", "authority",
        req("GET", f"https://{API}@evil.example.test/atk/absolute-form-userinfo", close),
        expect=(400, 403))  # fmt: skip
    add("absolute-form-other-port", "authority",
        req("GET", f"https://{API}:8443/atk/absolute-form-other-port", close),
        expect=(403,), reason=mm)  # fmt: skip
    add("host-other", "authority",
        req("GET", "/atk/host-other", close, host="evil.example.test"), expect=(403,),
        reason=mm, planes=("mitm",))  # fmt: skip
    add("host-other-port", "authority",
        req("GET", "/atk/host-other-port", close, host=f"{API}:8443"), expect=(403,),
        reason=mm, planes=("mitm",))  # fmt: skip
    add("host-duplicate", "authority",
        req("GET", "/atk/host-duplicate", "Host: evil.example.test", close), expect=(400, 403),
        planes=("mitm",))  # fmt: skip
    add("host-userinfo", "authority",
        req("GET", "/atk/host-userinfo", close, host=f"user@{API}"), expect=(400, 403),
        planes=("mitm",))  # fmt: skip
    add("host-case-and-dot-rebuilt", "authority",
        req("GET", "/atk/host-case-and-dot-rebuilt", close, host=API.upper() + "."),
        expect=(200,), reach=True)  # fmt: skip
    add("host-missing-rebuilt", "authority",
        req("GET", "/atk/host-missing-rebuilt", close, host=None), expect=(200, 400, 403),
        reach=True)  # fmt: skip
    add("sni-other-host", "authority", req("GET", "/atk/sni-other-host", close),
        sni="evil.example.test", expect=(403,), planes=("mitm",))  # fmt: skip
    h2_base = ((":method", "GET"), (":scheme", "https"))
    for name, extra in (
        ("h2-authority-other", ((":path", "/atk/h2-authority-other"),
                                (":authority", "evil.example.test"))),
        ("h2-host-other", ((":path", "/atk/h2-host-other"), (":authority", H2),
                           ("host", "evil.example.test"))),
        ("h2-host-only-other", ((":path", "/atk/h2-host-only-other"),
                                ("host", "evil.example.test"))),
        ("h2-authority-other-port", ((":path", "/atk/h2-authority-other-port"),
                                     (":authority", f"{H2}:8443"))),
        ("h2-path-absolute", ((":path", "https://evil.example.test/atk/h2-path-absolute"),
                              (":authority", H2))),
        ("h2-authority-userinfo", ((":path", "/atk/h2-authority-userinfo"),
                                   (":authority", f"user@{H2}"))),
    ):  # fmt: skip
        a.append(Attack(name, "authority", h2=h2_base + extra, planes=("mitm-h2",)))

    # -- framing: one request's bytes become a second, undecided request --------------------
    body = smuggled("X")

    def smuggle(name: str, *head: str, payload: str | None = None, **kw: Any) -> None:
        data = payload if payload is not None else smuggled(name)
        add(name, "framing", req("POST", f"/atk/{name}", *head, body=data), **kw)

    smuggle("cl-and-te", "Content-Length: 4", "Transfer-Encoding: chunked",
            payload="0\r\n\r\n" + smuggled("cl-and-te"))  # fmt: skip
    smuggle("te-and-cl", "Transfer-Encoding: chunked", "Content-Length: 60",
            payload="0\r\n\r\n" + smuggled("te-and-cl"))  # fmt: skip
    smuggle("cl-duplicate", "Content-Length: 0", "Content-Length: 60")
    smuggle("cl-list", "Content-Length: 0, 60")
    smuggle("cl-plus-sign", "Content-Length: +0")
    for name, te in (
        ("te-chunked-identity", "chunked, identity"),
        ("te-xchunked", "xchunked"),
        ("te-chunked-x", "chunkedx"),
        ("te-identity", "identity"),
        ("te-quoted", '"chunked"'),
    ):
        smuggle(name, f"Transfer-Encoding: {te}", payload="0\r\n\r\n" + smuggled(name))
    add("te-duplicate", "framing",
        req("POST", "/atk/te-duplicate", "Transfer-Encoding: chunked",
            "Transfer-Encoding: identity", body="0\r\n\r\n" + smuggled("te-duplicate")))  # fmt: skip
    add("te-space-before-colon", "framing",
        req("POST", "/atk/te-space-before-colon", "Transfer-Encoding : chunked",
            body="0\r\n\r\n" + smuggled("te-space-before-colon")))  # fmt: skip
    # Valid spellings are decided as one request: the smuggled bytes stay inside its body.
    add("te-leading-space", "framing",
        req("POST", "/atk/te-leading-space", "Transfer-Encoding:  chunked", close,
            body=chunked(smuggled("te-leading-space"))), expect=(200,), reach=True)  # fmt: skip
    add("te-uppercase", "framing",
        req("POST", "/atk/te-uppercase", "Transfer-Encoding: CHUNKED", close,
            body=chunked(smuggled("te-uppercase"))), expect=(200,), reach=True)  # fmt: skip
    add("get-with-body", "framing",
        req("GET", "/atk/get-with-body", f"Content-Length: {len(body)}", close, body=body),
        expect=(200,), reach=True)  # fmt: skip
    add("bare-lf", "framing",
        "GET /atk/bare-lf HTTP/1.1\nHost: api.example.test\nContent-Length: 0\n\n"
        + smuggled("bare-lf"), expect=(200, 400), reach=True)  # fmt: skip
    add("obs-fold-te", "framing",
        req("POST", "/atk/obs-fold-te", "Content-Length: 0", "X-Fold: a",
            " Transfer-Encoding: chunked", body=smuggled("obs-fold-te")))  # fmt: skip
    add("bare-cr-in-value", "framing",
        req("POST", "/atk/bare-cr-in-value", "X-A: a\rTransfer-Encoding: chunked",
            "Content-Length: 0", body=smuggled("bare-cr-in-value")))  # fmt: skip
    add("pipelined-denied-second", "framing",
        req("GET", "/atk/pipelined-denied-second") + smuggled("pipelined-denied-second"),
        expect=(200,), reach=True)  # fmt: skip
    add("keepalive-denied-second", "framing",
        req("GET", "/atk/keepalive-denied-second", "Content-Length: 0"),
        smuggled("keepalive-denied-second"), expect=(200,), reach=True)  # fmt: skip
    add("h2-body-unknown-length", "framing", planes=("mitm-h2-to-h1",),
        h2=((":method", "POST"), (":scheme", "https"), (":path", "/atk/h2-body-unknown-length"),
            (":authority", API)),
        body=smuggled("h2-body-unknown-length"), expect=(200,), reach=True)  # fmt: skip
    add("h2-end-to-end-body", "framing", planes=("mitm-h2",),
        h2=((":method", "POST"), (":scheme", "https"), (":path", "/atk/h2-end-to-end-body"),
            (":authority", H2)),
        body=smuggled("h2-end-to-end-body"), expect=(200,), reach=True)  # fmt: skip

    # -- limits ---------------------------------------------------------------------------------
    def limit(name: str, *head: str, target: str | None = None, **kw: Any) -> None:
        add(name, "limits", req("GET", target or f"/atk/{name}", *head, close), **kw)

    limit("header-1mb", "X-Big: " + "a" * (1 << 20), expect=(400, 431))
    limit("headers-10000", *(f"X-H{i}: v" for i in range(10000)), expect=(400, 431))
    limit("headers-101", *(f"X-H{i}: v" for i in range(100)), expect=(431,),
          reason="too-many-headers")  # fmt: skip
    limit("header-bytes-65k", *(f"X-H{i}: {'b' * 8000}" for i in range(9)), expect=(431,),
          reason="headers-too-large")  # fmt: skip
    limit("url-8k", target="/atk/url-8k?" + "q" * 8200, expect=(414,), reason="url-too-long")
    limit("url-100k", target="/atk/url-100k?" + "q" * 100_000, expect=(400, 414))
    limit("nul-in-value", "X-A: a\x00b", expect=(400,))
    limit("nul-in-name", "X-\x00A: b", expect=(400,))
    limit("under-limits", *(f"X-H{i}: v" for i in range(90)), "X-Long: " + "c" * 8000,
          target="/atk/under-limits?" + "q" * 7000, expect=(200,), reach=True)  # fmt: skip
    return a


ATTACKS = _attacks()
BY_NAME = {x.name: x for x in ATTACKS}


def ids(kind: str) -> list[str]:
    """`plane:name` of every attack of `kind` tried under `keyward run`."""
    return [f"{p}:{x.name}" for x in ATTACKS if x.kind == kind for p in x.planes]


def pod_planes(attack: Attack) -> tuple[str, ...]:
    """In a pod: TLS and plain HTTP both land on mitmproxy's transparent listener; services
    as under `keyward run`. HTTP/2 attacks need the HTTP/2 upstream, which only `run` has."""
    out = tuple(p for p in attack.planes if p in ("mitm", "service"))
    if "mitm" in out and attack.sni is None:
        out += ("mitm-plain",)
    return out


def pod_ids(kind: str) -> list[str]:
    return [f"{p}:{x.name}" for x in ATTACKS if x.kind == kind for p in pod_planes(x)]


# -- outcomes -------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one plane/mode made of all the attacks: client results, upstream, audit."""

    results: dict[str, dict[str, Any]]
    seen_paths: list[tuple[str, str, dict[str, str]]]  # (method, path, headers) upstream
    audit: list[dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)

    def check(self, key: str) -> None:
        plane, name = key.split(":", 1)
        attack = BY_NAME[name]
        res = self.results.get(key)
        assert res is not None, f"attack {key} was not run"
        got = [p for _, p, _ in self.seen_paths if f"smuggled-{name}" in p]
        assert got == [], f"smuggled request reached the upstream: {got}"
        mark = f"/atk/{plane}/{name}"
        reached = [(p, h) for _, p, h in self.seen_paths if p.startswith(mark)]
        if plane == "mitm-h2-to-h1" and res.get("alpn") != "h2":
            assert reached == [] or len(reached) == 1
            return  # the client was not offered HTTP/2: no translation can happen
        statuses = res.get("statuses") or []
        if not statuses and res.get("alpn") == "h2" and not attack.reach:
            assert reached == [], f"{key} reached the upstream: {reached}"
            return  # the HTTP/2 layer refused the stream (reset, GOAWAY or closed, no status)
        assert statuses, f"no response at all: {res}"
        assert statuses[0] in attack.expect, f"{key}: {res}"
        if attack.reason and statuses[0] != 400:
            assert attack.reason in res.get("reasons", []), res
        if not attack.reach or statuses[0] != 200:
            assert reached == [], f"{key} reached the upstream: {reached}"
            return
        assert len(reached) == 1, reached
        host = {k.lower(): v for k, v in reached[0][1].items()}.get("host")
        want = {"mitm-h2": H2, "mitm-plain": PLAIN}.get(plane, API)
        assert host == want, f"upstream Host {host!r}"
        audited = [r for r in self.audit if str(r.get("path", "")).startswith(mark)]
        assert [r["decision"] for r in audited] == ["allow"], audited


def run_attacks(argv: list[str], attacks: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [*argv, sys.executable, str(CLIENT)],
        input=json.dumps(attacks),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        **kw,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def specs(
    planes: dict[str, tuple[str, int, bool]],
    which: Callable[[Attack], tuple[str, ...]] = lambda a: a.planes,
) -> list[dict[str, Any]]:
    """Every attack for every plane given: plane -> (host, port, tls)."""
    out = []
    for attack in ATTACKS:
        for plane in which(attack):
            if plane in planes:
                host, port, tls = planes[plane]
                out.append(attack.spec(plane, (host, port), tls))
    return out


# -- explicit mode: `keyward run`, an in-process upstream on loopback -------------------------
EXPLICIT_CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    {api}:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /admin/**"]
    {h2}:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /admin/**"]
services:
  api: {{ listen: 0, upstream: "https://{api}" }}
upstream:
  ca_bundle: {ca}
  resolve:
    "{api}:443": "127.0.0.1:{port}"
    "{api}:8443": "127.0.0.1:{port}"
    "evil.example.test:443": "127.0.0.1:{port}"
    "{h2}:443": "127.0.0.1:{h2port}"
audit:
  path: {audit}
"""


class LoopThread:
    """An event loop in a thread: the fake upstreams outlive any one test's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def _seen(upstream: Upstream, h2: H2Upstream) -> list[tuple[str, str, dict[str, str]]]:
    out = [
        (str(r["method"]), str(r["path"]), dict(r["headers"]))  # type: ignore[call-overload]
        for r in upstream.seen.requests
    ]
    for s in h2.seen.streams:
        pseudo: dict[str, str] = s["pseudo"]  # type: ignore[assignment]
        headers = {k: v for k, v in s["headers"]}  # type: ignore[union-attr, misc]
        headers.setdefault("host", pseudo.get(":authority", ""))
        out.append((pseudo.get(":method", ""), pseudo.get(":path", ""), headers))
    return out


def explicit_outcome(tmp: Path) -> Iterator[Outcome]:
    """All attacks through `keyward run`: the mitm plane (tunnel) and the service plane."""
    lt = LoopThread()
    try:
        ca = make_ca(tmp / "pki")
        names = (API, "evil.example.test", H2)
        upstream: Upstream = lt.run(Upstream.start(ca.server_context(tmp / "pki", *names)))
        h2: H2Upstream = lt.run(H2Upstream.start(ca.server_context(tmp / "pki", *names)))
        config = tmp / "keyward.yaml"
        audit = tmp / "audit.jsonl"
        config.write_text(
            EXPLICIT_CONFIG.format(
                api=API, h2=H2, ca=ca.path, port=upstream.port, h2port=h2.port, audit=audit
            )
        )
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env.update(TEST_API_KEY=REAL_KEY, KEYWARD_STATE=str(tmp / "state"), PYTHONPATH=str(ROOT))
        # the service port is only known inside the run: the client reads it from the env
        script = (
            "import os, runpy, sys\n"
            "port = int(os.environ['KEYWARD_SERVICE_API_URL'].rsplit(':', 1)[1])\n"
            "data = sys.stdin.read().replace('\"__SERVICE_PORT__\"', str(port))\n"
            "import io; sys.stdin = io.StringIO(data)\n"
            f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')\n"
        )
        attacks = specs(
            {
                "mitm": (API, 443, True),
                "mitm-h2": (H2, 443, True),
                "mitm-h2-to-h1": (API, 443, True),
                "service": ("127.0.0.1", 0, False),
            }
        )
        for spec in attacks:
            if spec["name"].startswith("service:"):
                spec["port"] = "__SERVICE_PORT__"
        proc = subprocess.run(
            [*KEYWARD, "run", "-c", str(config), "--", sys.executable, "-c", script],
            input=json.dumps(attacks),
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=tmp,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        records = [json.loads(x) for x in audit.read_text().splitlines() if x]
        yield Outcome(results, _seen(upstream, h2), records, {"stderr": proc.stderr})
        lt.run(upstream.close())
        lt.run(h2.close())
    finally:
        lt.stop()


@pytest.fixture(scope="session")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    yield from explicit_outcome(tmp_path_factory.mktemp("wire-explicit"))


# -- transparent mode: a pod in namespaces (root) ---------------------------------------------
POD_UPSTREAM = "203.0.113.10"
SERVICE_PORT = 8701
POD_CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    {api}:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /admin/**"]
    "{plain}:80":
      headers: {{ X-Key: "{{key}}" }}
      plain_http: true
      deny: ["DELETE /admin/**"]
services:
  api: {{ listen: {service}, upstream: "https://{api}" }}
upstream:
  ca_bundle: {ca}
  resolve:
    "{api}:443": "{ip}:443"
    "{plain}:80": "{ip}:80"
    "evil.example.test:443": "{ip}:443"
audit:
  path: {audit}
"""


def pod_outcome() -> Iterator[Outcome]:
    """All attacks from the agent's uid in a pod: no proxy variables, the kernel redirects."""
    import shutil
    import tempfile

    from gateway.pod.isolate import IsolatedPod
    from gateway.pod.netns import Topology

    base = Path(tempfile.mkdtemp(prefix="keyward-wire-pod-"))
    base.chmod(0o755)
    up = base / "upstream"
    up.mkdir()
    try:
        with Topology() as topo:
            start_in_namespace(topo.upstream, up, [POD_UPSTREAM], [API, PLAIN, "evil.example.test"])
            audit = base / "audit.jsonl"
            config = base / "keyward.yaml"
            config.write_text(
                POD_CONFIG.format(api=API, plain=PLAIN, service=SERVICE_PORT, ip=POD_UPSTREAM,
                                  ca=up / "pki" / "test-ca.pem", audit=audit)
            )  # fmt: skip
            pod = IsolatedPod(topo.pod, config, base / "state", work=base / "pod")
            pod.start(env={**os.environ, "TEST_API_KEY": REAL_KEY})
            try:
                client = pod.work / "attack_client.py"
                shutil.copy(CLIENT, client)
                client.chmod(0o644)
                attacks = specs(
                    {
                        "mitm": (API, 443, True),
                        "mitm-plain": (PLAIN, 80, False),
                        "service": ("127.0.0.1", SERVICE_PORT, False),
                    },
                    pod_planes,
                )
                r = pod.run_agent(
                    [sys.executable, str(client)], input=json.dumps(attacks), timeout=900
                )
                assert r.returncode == 0, r.stderr[-3000:]
                results = json.loads(r.stdout.strip().splitlines()[-1])
            finally:
                pod.stop_gateway()
            log = up / "seen.jsonl"
            seen = (
                [json.loads(x) for x in log.read_text().splitlines() if x] if log.exists() else []
            )
            paths = [("", str(x.get("path", "")), dict(x.get("headers", {}))) for x in seen]
            records = [json.loads(x) for x in audit.read_text().splitlines() if x]
            yield Outcome(results, paths, records)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pod(root_ok: None) -> Iterator[Outcome]:
    yield from pod_outcome()
