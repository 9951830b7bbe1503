"""keyward benchmarks: both data planes against a direct connection and vanilla mitmdump, in one
run, everything on 127.0.0.1.

    python scripts/bench.py [--quick | --tiny] [--json OUT] [--uvloop] [--compare TREE]

`--quick` finishes in under 2 minutes, the full run in under 15 (2-core machine); `--tiny` is
the smoke-test size (about 30 s, figures too small to quote).

Set-up: a fast upstream (raw asyncio HTTP/1.1, HTTPS with a test CA) and the load generator
(`bench_support/loadgen.py`, an async client that can do CONNECT + TLS; `wrk` is run as well
where it applies) share one core; the gateway under test (`bench_support/gateway.py`: the
embedded gateway `keyward run` starts, i.e. the mitm plane as an explicit proxy with all its
addons plus the aiohttp service plane) and vanilla `mitmdump` (no addons, lazy connect,
upstream verified against the test CA) get the other core. Every request keeps its connection
alive; the config injects a credential into every request (so every addon does its work) and
writes the audit log to a file.

Planes:
- `direct`: the load generator straight to the upstream over HTTPS;
- `service`: plain HTTP to the service plane, which forwards over pooled, verified HTTPS
  (upstream `https://api.bench.test`, dialled through `upstream.resolve`);
- `mitm`: HTTPS through the mitm plane as an explicit proxy: CONNECT 127.0.0.1:<upstream>,
  matched by a `host:port` rule that injects a header;
- `mitmdump`: the same CONNECT through vanilla mitmdump.
Both proxies are given the same CONNECT target, the upstream's address, so that vanilla
mitmdump needs no name resolution; the service plane dials its name through `upstream.resolve`.

`--compare TREE` also starts a gateway from another checkout of keyward (e.g. `git worktree add
../keyward-old REF`) and measures it interleaved with this one (same upstream, same load
generator, alternating runs), for a before/after table that machine noise cannot fake.

JSON keys (stable; every number is > 0 unless marked "may be <= 0"):
- `meta`: {mode, cpus, pinned (0/1), seconds} plus version strings.
- `direct`, `service`, `mitm`, `mitmdump`: {rps_c1, rps_c16, rps_c64 (median requests/s at
  concurrency 1/16/64), p50_ms, p99_ms (latency at c=1, median over repeats), p50_ms_c64,
  p99_ms_c64, ratio_vs_direct (rps_c64 / direct rps_c64), added_p50_ms (p50_ms - direct
  p50_ms; may be <= 0), spread: {c1|c16|c64: [min, median, max] rps}}.
- `summary`: {service_vs_direct, service_vs_mitmdump, mitm_vs_mitmdump (rps ratios at c=64),
  mitm_vs_mitmdump_c1, mitm_vs_mitmdump_c16}.
- `sse`: {events, interval_ms, and per plane direct|service|mitm|mitmdump: {delay_p50_ms,
  delay_p99_ms (upstream send -> client receive, per event), ttfe_ms (request sent -> first
  event, median), added_p50_ms, added_p99_ms (minus direct's; may be <= 0; not for direct)}}.
  Vanilla mitmdump buffers whole bodies unless told to stream: its figures show that.
- `bigbody`: {bytes, gateway_base_rss_mb, and per plane direct|service|mitm: {down_mb_s,
  up_mb_s, and for service|mitm: down_peak_rss_mb, up_peak_rss_mb (VmHWM of the gateway
  process, reset before each transfer)}}.
- `rules`: {rps_10, rps_10000 (mitm plane, c=16, median), ratio (rps_10000 / rps_10),
  start_s_10, start_s_10000 (gateway process spawn -> listening)}.
- `startup`: {median_s, min_s, max_s, runs}: `keyward run -c F -- curl` from exec to the end
  of the first proxied request.
- `wrk`: null, or {direct|service: {rps_c1, rps_c16, rps_c64}} measured with wrk (one thread).
- `compare`: absent, or {tree, and per plane service|mitm: {rps_c1, rps_c64, p50_ms,
  down_mb_s, down_cpu_s_per_gib (a `bigbody`-sized download; the gateway process's CPU
  seconds per GiB, in clock ticks: may be 0 with --tiny bodies, and its ratio then 0):
  {before, after, ratio (after / before)}}, startup_s: {before, after, ratio}} (medians,
  interleaved).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).resolve().parent / "bench_support"
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.support.configs import host_rules  # noqa: E402
from tests.support.pki import make_ca  # noqa: E402

HOST = "api.bench.test"
PLANES = ("direct", "service", "mitm", "mitmdump")
CONCURRENCY = (1, 16, 64)
SECRET = "sk-bench-REALSECRET-0123456789abcdefXYZ"
console = Console(width=None if sys.stdout.isatty() else 110)


@dataclass(frozen=True)
class Profile:
    """How much of everything a run does."""

    name: str
    rps_seconds: float  # time cap per load run
    rps_requests: int  # count cap per load run
    repeats: int  # load runs per plane and concurrency
    sse_events: int
    sse_interval: float
    sse_repeats: int
    body_bytes: int
    rules_repeats: int
    startup_runs: int
    wrk: bool
    compare_rounds: int  # interleaved before/after rounds with --compare


PROFILES = {
    "tiny": Profile("tiny", 0.3, 2_000, 1, 5, 0.01, 1, 4 << 20, 1, 1, True, 1),
    "quick": Profile("quick", 1.0, 50_000, 2, 20, 0.01, 3, 64 << 20, 2, 3, True, 4),
    "full": Profile("full", 3.0, 500_000, 5, 40, 0.01, 10, 1 << 30, 5, 7, True, 7),
}


# -- processes -----------------------------------------------------------------------------
def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """(load generator + upstream cpus, gateway cpus), or (None, None) on one core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


class Processes:
    """Every process the run starts, stopped by pid on the way out."""

    def __init__(self, logs: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.logs = logs

    def spawn(
        self,
        argv: list[str],
        cpus: set[int] | None,
        env: dict[str, str] | None = None,
        stdout: int = subprocess.PIPE,
        cwd: Path | None = None,
    ) -> subprocess.Popen[str]:
        name = Path(argv[1] if len(argv) > 1 else argv[0]).stem
        log = self.logs / f"{name}.{len(self.procs)}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=err,
                env=env,
                text=True,
                preexec_fn=_pin(cpus),
                cwd=cwd,
            )
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child to `cpus` (None: no pinning)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def read_ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The JSON line a helper prints once it listens."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"{proc.args[1]} did not report ready within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        tail = Path(proc.log).read_text()[-1500:]  # type: ignore[attr-defined]
        raise RuntimeError(f"{proc.args[1]} exited during start-up ({proc.returncode}):\n{tail}")
    return json.loads(line)


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_reset(pid: int) -> bool:
    """Reset the process's VmHWM (Linux clear_refs 5); False if not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- the world ---------------------------------------------------------------------------------
def filler_rules(n: int) -> str:
    """`n` host rules of every kind: exact, wildcard, host:port, CIDR."""
    return host_rules(n, ("host", "wildcard", "port", "network"))


def write_config(path: Path, *, ca: Path, upstream_port: int, rules: int, audit: Path) -> Path:
    text = f"""version: 1
secrets:
  key: {{ env: BENCH_API_KEY }}
egress:
  default: deny
  hosts:
    {HOST}:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /admin/**"]
    "127.0.0.1:{upstream_port}":
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /admin/**"]
{filler_rules(rules - 2)}
placeholders:
  BENCH_API_KEY: {{ secret: key }}
services:
  api: {{ listen: 0, upstream: "https://{HOST}" }}
upstream:
  ca_bundle: {ca}
  resolve: {{ "{HOST}:443": "127.0.0.1:{upstream_port}" }}
audit:
  path: {audit}
"""
    path.write_text(text)
    return path


@dataclass
class World:
    tmp: Path
    procs: Processes
    gen_cpus: set[int] | None
    gw_cpus: set[int] | None
    test_ca: Path
    upstream_port: int = 0
    gateway: dict[str, Any] | None = None
    gateway_proc: subprocess.Popen[str] | None = None
    mitmdump_port: int = 0
    mitmdump_ca: Path | None = None
    uvloop: bool = False
    gateway_start_s: float = 0.0

    def env(self, root: Path = ROOT) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env["BENCH_API_KEY"] = SECRET
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        return env

    def start_upstream(self) -> None:
        cert, key = make_ca(self.tmp / "pki").leaf(self.tmp / "pki", HOST, "127.0.0.1")
        argv = [sys.executable, str(SUPPORT / "upstream.py"), "--cert", str(cert)]
        proc = self.procs.spawn([*argv, "--key", str(key)], self.gen_cpus, self.env())
        self.upstream_port = int(read_ready(proc)["https"])

    def start_gateway(
        self, rules: int, name: str, root: Path = ROOT
    ) -> tuple[subprocess.Popen[str], dict, float]:
        """A gateway process (keyward from `root`) with `rules` host rules; (process, its
        ready line, start seconds)."""
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        cfg = write_config(
            d / "keyward.yaml",
            ca=self.test_ca,
            upstream_port=self.upstream_port,
            rules=rules,
            audit=d / "audit.jsonl",
        )
        runner = root / "scripts" / "bench_support" / "gateway_runner.py"
        argv = [sys.executable, str(runner), "--config", str(cfg)]
        argv += ["--state", str(self.tmp / "state"), "--audit", str(d / "audit.jsonl")]
        if self.uvloop:
            argv.append("--uvloop")
        t0 = time.monotonic()
        proc = self.procs.spawn(argv, self.gw_cpus, self.env(root), cwd=root)
        ready = read_ready(proc, 120)
        return proc, ready, time.monotonic() - t0

    def start_mitmdump(self) -> None:
        mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent))
        mitmdump = mitmdump or shutil.which("mitmdump")
        if mitmdump is None:
            raise RuntimeError("mitmdump not found (pip install mitmproxy)")
        conf = self.tmp / "mitmdump-conf"
        conf.mkdir(exist_ok=True)
        self.mitmdump_port = free_port()
        argv = [mitmdump, "-q", "--listen-host", "127.0.0.1"]
        argv += ["--listen-port", str(self.mitmdump_port), "--set", f"confdir={conf}"]
        argv += ["--set", f"ssl_verify_upstream_trusted_ca={self.test_ca}"]
        argv += ["--set", "connection_strategy=lazy"]
        self.procs.spawn(argv, self.gw_cpus, self.env(), stdout=subprocess.DEVNULL)
        wait_port(self.mitmdump_port)
        self.mitmdump_ca = conf / "mitmproxy-ca-cert.pem"

    def target(
        self, plane: str, proxy_port: int | None = None, gateway: dict[str, Any] | None = None
    ) -> list[str]:
        """Load-generator arguments that reach the upstream through `plane`."""
        up = f"127.0.0.1:{self.upstream_port}"
        tls = ["--tls", "--authority", up]
        gateway = gateway or self.gateway
        assert gateway is not None
        if plane == "direct":
            return ["--connect", up, *tls, "--cafile", str(self.test_ca)]
        if plane == "service":
            port = gateway["services"]["api"]
            return ["--connect", f"127.0.0.1:{port}", "--authority", f"127.0.0.1:{port}"]
        if plane == "mitm":
            port = proxy_port or gateway["proxy"]
            ca = gateway["ca"]
        else:
            assert self.mitmdump_ca is not None
            port, ca = self.mitmdump_port, str(self.mitmdump_ca)
        return ["--connect", f"127.0.0.1:{port}", "--tunnel", up, *tls, "--cafile", ca]

    def loadgen(self, mode: str, args: list[str], timeout: float) -> dict[str, Any]:
        argv = [sys.executable, str(SUPPORT / "loadgen.py"), mode, *args]
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            preexec_fn=_pin(self.gen_cpus),
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"loadgen {mode} failed: {out.stderr.strip()[-400:]}")
        return json.loads(out.stdout)


# -- measurements -------------------------------------------------------------------------------
def med(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else 0.0


def spread(values: list[float]) -> list[float]:
    return [round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def measure_rps(world: World, prof: Profile) -> dict[str, dict[str, Any]]:
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(prof.repeats):  # interleaved, so drift hits every plane alike
        for plane in PLANES:
            for c in CONCURRENCY:
                args = world.target(plane)
                args += ["--concurrency", str(c), "--requests", str(prof.rps_requests)]
                args += ["--duration", str(prof.rps_seconds)]
                res = world.loadgen("rps", args, prof.rps_seconds + 60)
                if res["requests"] == 0 or res["errors"] > res["requests"] // 100:
                    raise RuntimeError(f"{plane} c={c}: {res}")
                runs.setdefault((plane, c), []).append(res)
    out: dict[str, dict[str, Any]] = {}
    for plane in PLANES:
        rps = {c: [r["rps"] for r in runs[(plane, c)]] for c in CONCURRENCY}
        out[plane] = {
            "rps_c1": med(rps[1]),
            "rps_c16": med(rps[16]),
            "rps_c64": med(rps[64]),
            "p50_ms": med([r["p50_ms"] for r in runs[(plane, 1)]]),
            "p99_ms": med([r["p99_ms"] for r in runs[(plane, 1)]]),
            "p50_ms_c64": med([r["p50_ms"] for r in runs[(plane, 64)]]),
            "p99_ms_c64": med([r["p99_ms"] for r in runs[(plane, 64)]]),
            "spread": {f"c{c}": spread(rps[c]) for c in CONCURRENCY},
        }
    direct = out["direct"]
    for plane in PLANES:
        out[plane]["ratio_vs_direct"] = round(out[plane]["rps_c64"] / direct["rps_c64"], 3)
        out[plane]["added_p50_ms"] = round(out[plane]["p50_ms"] - direct["p50_ms"], 3)
    return out


def measure_wrk(world: World, prof: Profile) -> dict[str, dict[str, float]] | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    assert world.gateway is not None
    urls = {
        "direct": f"https://127.0.0.1:{world.upstream_port}/v1/chat/completions",
        "service": f"http://127.0.0.1:{world.gateway['services']['api']}/v1/chat/completions",
    }
    out: dict[str, dict[str, float]] = {}
    seconds = max(1, round(prof.rps_seconds))
    for plane, url in urls.items():
        figures: dict[str, float] = {}
        for c in CONCURRENCY:
            argv = [wrk, "-t1", f"-c{c}", f"-d{seconds}s", "--timeout", "10s", url]
            res = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=seconds + 30,
                preexec_fn=_pin(world.gen_cpus),
                check=False,
            )
            figures[f"rps_c{c}"] = _wrk_rps(res.stdout)
        out[plane] = figures
    return out


def _wrk_rps(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("Requests/sec:"):
            return round(float(line.split()[1]), 1)
    return 0.0


def measure_sse(world: World, prof: Profile) -> dict[str, Any]:
    out: dict[str, Any] = {"events": prof.sse_events, "interval_ms": prof.sse_interval * 1000}
    raw: dict[str, dict[str, Any]] = {}
    for plane in PLANES:
        args = world.target(plane)
        args += ["--events", str(prof.sse_events), "--interval", str(prof.sse_interval)]
        args += ["--repeats", str(prof.sse_repeats), "--duration", "120"]
        budget = prof.sse_events * prof.sse_interval * prof.sse_repeats + 60
        raw[plane] = world.loadgen("sse", args, budget)
        if raw[plane]["errors"] or not raw[plane]["ttfe_ms"]:
            raise RuntimeError(f"sse through {plane}: {raw[plane]}")
    base = raw["direct"]["delays_ms"]
    for plane in PLANES:
        delays = raw[plane]["delays_ms"]
        fig = {
            "delay_p50_ms": pct(delays, 0.5),
            "delay_p99_ms": pct(delays, 0.99),
            "ttfe_ms": med(raw[plane]["ttfe_ms"]),
        }
        if plane != "direct":
            fig["added_p50_ms"] = round(fig["delay_p50_ms"] - pct(base, 0.5), 3)
            fig["added_p99_ms"] = round(fig["delay_p99_ms"] - pct(base, 0.99), 3)
        out[plane] = fig
    return out


def measure_bigbody(world: World, prof: Profile) -> dict[str, Any]:
    assert world.gateway is not None
    pid = int(world.gateway["pid"])
    out: dict[str, Any] = {
        "bytes": prof.body_bytes,
        "gateway_base_rss_mb": proc_status_mb(pid, "VmRSS"),
    }
    budget = prof.body_bytes / 5e6 + 60  # never slower than 5 MB/s, or the run is broken
    for plane in ("direct", "service", "mitm"):
        fig: dict[str, float] = {}
        for direction in ("down", "up"):
            resettable = plane != "direct" and peak_rss_reset(pid)
            args = [*world.target(plane), "--direction", direction, "--duration", f"{budget}"]
            res = world.loadgen("body", [*args, "--size", str(prof.body_bytes)], budget)
            fig[f"{direction}_mb_s"] = res["mb_s"]
            if plane != "direct":
                fig[f"{direction}_peak_rss_mb"] = proc_status_mb(pid, "VmHWM")
                fig[f"{direction}_rss_reset"] = float(resettable)
        out[plane] = fig
    return out


def measure_rules(world: World, prof: Profile) -> dict[str, float]:
    assert world.gateway is not None
    proc, big, start_big = world.start_gateway(10_000, "rules10k")
    try:
        rps: dict[int, list[float]] = {10: [], 10_000: []}
        for _ in range(prof.rules_repeats):
            for n, port in ((10, world.gateway["proxy"]), (10_000, big["proxy"])):
                args = world.target("mitm", proxy_port=port)
                args += ["--concurrency", "16", "--requests", str(prof.rps_requests)]
                args += ["--duration", str(prof.rps_seconds)]
                rps[n].append(world.loadgen("rps", args, prof.rps_seconds + 60)["rps"])
    finally:
        world.procs.stop(proc)
    return {
        "rps_10": med(rps[10]),
        "rps_10000": med(rps[10_000]),
        "ratio": round(med(rps[10_000]) / med(rps[10]), 3),
        "start_s_10": round(world.gateway_start_s, 3),
        "start_s_10000": round(start_big, 3),
    }


def measure_startup(world: World, prof: Profile, root: Path = ROOT) -> dict[str, Any]:
    """`keyward run -- curl URL`: from exec to the end of the first proxied request."""
    d = world.tmp / "startup"
    d.mkdir(exist_ok=True)
    cfg = write_config(
        d / "keyward.yaml",
        ca=world.test_ca,
        upstream_port=world.upstream_port,
        rules=10,
        audit=d / "audit.jsonl",
    )
    url = f"https://{HOST}/v1/models"
    if shutil.which("curl"):
        child = ["sh", "-c", f'curl -sS --fail -o /dev/null "{url}" && date +%s.%N']
    else:
        code = (
            f"import time, urllib.request; urllib.request.urlopen({url!r}, timeout=10).read(); "
            "print(time.time())"
        )
        child = [sys.executable, "-c", code]
    argv = [sys.executable, "-m", "gateway", "run", "-c", str(cfg)]
    argv += ["--state", str(world.tmp / "state"), "--audit", str(d / "audit.jsonl"), "--", *child]
    times: list[float] = []
    for _ in range(prof.startup_runs):
        t0 = time.time()
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            env=world.env(root),
            cwd=root,
            preexec_fn=_pin(world.gw_cpus),
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"keyward run failed: {res.stderr.strip()[-400:]}")
        times.append(float(res.stdout.strip().splitlines()[-1]) - t0)
    return {
        "median_s": med(times),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "runs": len(times),
    }


def measure_compare(world: World, prof: Profile, tree: Path) -> dict[str, Any]:
    """This checkout ("after") against `tree` ("before"), interleaved run by run."""
    proc, before_gw, _ = world.start_gateway(10, "compare", root=tree)
    gateways = {"before": before_gw, "after": world.gateway}
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    starts: dict[str, list[float]] = {"before": [], "after": []}
    try:
        for _ in range(prof.compare_rounds):
            for which, gw in gateways.items():
                for plane in ("service", "mitm"):
                    for c in (1, 64):
                        args = world.target(plane, gateway=gw)
                        args += ["--concurrency", str(c), "--requests", str(prof.rps_requests)]
                        args += ["--duration", str(prof.rps_seconds)]
                        res = world.loadgen("rps", args, prof.rps_seconds + 60)
                        runs.setdefault((which, plane, c), []).append(res)
        budget = prof.body_bytes / 5e6 + 60
        for _ in range(prof.compare_rounds):
            for which, gw in gateways.items():
                for plane in ("service", "mitm"):
                    cpu = cpu_seconds(int(gw["pid"]))
                    args = [*world.target(plane, gateway=gw), "--direction", "down"]
                    args += ["--duration", f"{budget}", "--size", str(prof.body_bytes)]
                    res = world.loadgen("body", args, budget)
                    res["cpu_s_per_gib"] = (cpu_seconds(int(gw["pid"])) - cpu) / (
                        prof.body_bytes / (1 << 30)
                    )
                    runs.setdefault((which, plane, 0), []).append(res)
        for _ in range(prof.compare_rounds):
            for which, root in (("before", tree), ("after", ROOT)):
                one = replace(prof, startup_runs=1)
                starts[which].append(measure_startup(world, one, root)["median_s"])
    finally:
        world.procs.stop(proc)

    def pair(before: float, after: float) -> dict[str, float]:
        return {
            "before": before,
            "after": after,
            "ratio": round(after / before, 3) if before else 0,
        }

    out: dict[str, Any] = {"tree": str(tree)}
    for plane in ("service", "mitm"):
        fig = {}
        for c in (1, 64):
            b, a = (med([r["rps"] for r in runs[(w, plane, c)]]) for w in ("before", "after"))
            fig[f"rps_c{c}"] = pair(b, a)
        b, a = (med([r["p50_ms"] for r in runs[(w, plane, 1)]]) for w in ("before", "after"))
        fig["p50_ms"] = pair(b, a)
        for key in ("mb_s", "cpu_s_per_gib"):
            b, a = (med([r[key] for r in runs[(w, plane, 0)]]) for w in ("before", "after"))
            fig[f"down_{key}"] = pair(b, a)
        out[plane] = fig
    out["startup_s"] = pair(med(starts["before"]), med(starts["after"]))
    return out


def render_compare(cmp: dict[str, Any]) -> None:
    t = Table(title=f"before ({cmp['tree']}) / after (this checkout), interleaved medians")
    for col in ("figure", "before", "after", "after/before"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    rows = [
        (f"{plane} {label}", cmp[plane][key])
        for plane in ("service", "mitm")
        for key, label in (
            ("rps_c1", "rps c=1"),
            ("rps_c64", "rps c=64"),
            ("p50_ms", "p50 ms"),
            ("down_mb_s", "download MB/s"),
            ("down_cpu_s_per_gib", "download gateway CPU s/GiB"),
        )
    ]
    rows.append(("keyward run -> first request, s", cmp["startup_s"]))
    for label, f in rows:
        t.add_row(label, f"{f['before']:.3f}", f"{f['after']:.3f}", f"{f['ratio']:.2f}")
    console.print(t)


# -- report ---------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> None:
    t = Table(title="request rate (keep-alive; latency at c=1)")
    for col in ("plane", "rps c=1", "rps c=16", "rps c=64 min/med/max", "p50 ms", "p99 ms"):
        t.add_column(col, justify="right" if col != "plane" else "left")
    t.add_column("+p50 ms", justify="right")
    t.add_column("x direct", justify="right")
    for plane in PLANES:
        p = result[plane]
        lo, mid, hi = p["spread"]["c64"]
        t.add_row(
            plane,
            f"{p['rps_c1']:.0f}",
            f"{p['rps_c16']:.0f}",
            f"{lo:.0f} / {mid:.0f} / {hi:.0f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            f"{p['added_p50_ms']:+.2f}",
            f"{p['ratio_vs_direct']:.2f}",
        )
    console.print(t)
    s = result["summary"]
    console.print(
        f"service/direct {s['service_vs_direct']:.2f}   service/mitmdump "
        f"{s['service_vs_mitmdump']:.1f}   mitm/mitmdump c1 {s['mitm_vs_mitmdump_c1']:.2f}"
        f" c16 {s['mitm_vs_mitmdump_c16']:.2f} c64 {s['mitm_vs_mitmdump']:.2f}"
    )
    if result.get("wrk"):
        t = Table(title="wrk (one thread), rps")
        for col in ("plane", "c=1", "c=16", "c=64"):
            t.add_column(col)
        for plane, f in result["wrk"].items():
            t.add_row(plane, *(f"{f[f'rps_c{c}']:.0f}" for c in CONCURRENCY))
        console.print(t)
    sse = result["sse"]
    t = Table(title=f"SSE: {sse['events']} events every {sse['interval_ms']:.0f} ms")
    for col in ("plane", "delay p50 ms", "delay p99 ms", "added p50", "added p99", "TTFE ms"):
        t.add_column(col)
    for plane in PLANES:
        f = sse[plane]
        added = [f"{f[k]:+.2f}" if k in f else "-" for k in ("added_p50_ms", "added_p99_ms")]
        t.add_row(
            plane,
            f"{f['delay_p50_ms']:.2f}",
            f"{f['delay_p99_ms']:.2f}",
            *added,
            f"{f['ttfe_ms']:.2f}",
        )
    console.print(t)
    bb = result["bigbody"]
    t = Table(
        title=f"{bb['bytes'] / (1 << 20):.0f} MiB body each way "
        f"(gateway RSS before: {bb['gateway_base_rss_mb']} MB)"
    )
    for col in ("plane", "down MB/s", "up MB/s", "down peak RSS MB", "up peak RSS MB"):
        t.add_column(col)
    for plane in ("direct", "service", "mitm"):
        f = bb[plane]
        t.add_row(
            plane,
            f"{f['down_mb_s']:.0f}",
            f"{f['up_mb_s']:.0f}",
            str(f.get("down_peak_rss_mb", "-")),
            str(f.get("up_peak_rss_mb", "-")),
        )
    console.print(t)
    r, st = result["rules"], result["startup"]
    console.print(
        f"rules (mitm, c=16): 10 -> {r['rps_10']:.0f} rps, 10,000 -> {r['rps_10000']:.0f} rps, "
        f"ratio {r['ratio']:.3f}; gateway start {r['start_s_10']:.2f} s / "
        f"{r['start_s_10000']:.2f} s"
    )
    console.print(
        f"keyward run -> first proxied request: median {st['median_s']:.3f} s "
        f"(min {st['min_s']:.3f}, max {st['max_s']:.3f}, {st['runs']} runs)"
    )
    render_targets(result)
    if result.get("compare"):
        render_compare(result["compare"])


def render_targets(result: dict[str, Any]) -> None:
    s, sse, bb = result["summary"], result["sse"], result["bigbody"]
    peak = max(bb[p][f"{d}_peak_rss_mb"] for p in ("service", "mitm") for d in ("down", "up"))
    at_least = [
        ("service rps >= 0.35 x direct (c=64)", s["service_vs_direct"], 0.35),
        ("service rps >= 10 x mitmdump (c=64)", s["service_vs_mitmdump"], 10.0),
        ("mitm rps >= 0.90 x mitmdump (c=64)", s["mitm_vs_mitmdump"], 0.9),
        ("10k rules <= 5 % slower (ratio)", result["rules"]["ratio"], 0.95),
    ]
    at_most = [
        ("service added p50 <= 1 ms", result["service"]["added_p50_ms"], 1.0),
        ("mitm added p50 <= 3 ms", result["mitm"]["added_p50_ms"], 3.0),
        ("SSE added p99 <= 5 ms (service)", sse["service"]["added_p99_ms"], 5.0),
        ("SSE added p99 <= 5 ms (mitm)", sse["mitm"]["added_p99_ms"], 5.0),
        ("big body peak RSS <= 150 MB", peak, 150.0),
        ("keyward run -> first request <= 1.5 s", result["startup"]["median_s"], 1.5),
    ]
    t = Table(title="targets (issue 6)")
    for col in ("target", "now", "met"):
        t.add_column(col)
    rows = [(n, v, v >= lim) for n, v, lim in at_least] + [
        (n, v, v <= lim) for n, v, lim in at_most
    ]
    for name, value, ok in rows:
        t.add_row(name, f"{value:.3f}", "[green]yes[/]" if ok else "[red]no[/]")
    console.print(t)


# -- main -----------------------------------------------------------------------------------
def ensure_wrk() -> None:
    """Install wrk from the distribution if it is missing and we may (root with apt-get)."""
    if shutil.which("wrk") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, timeout=120, env=env
        )


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "mitmproxy": version("mitmproxy"),
        "aiohttp": version("aiohttp"),
    }


def run(prof: Profile, use_uvloop: bool, compare: Path | None = None) -> dict[str, Any]:
    started = time.monotonic()
    gen_cpus, gw_cpus = cpu_plan()
    with tempfile.TemporaryDirectory(prefix="keyward-bench-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp)
        world = World(tmp, procs, gen_cpus, gw_cpus, tmp / "pki" / "test-ca.pem", uvloop=use_uvloop)
        try:
            with console.status("starting upstream, gateway and mitmdump"):
                world.start_upstream()
                world.gateway_proc, world.gateway, world.gateway_start_s = world.start_gateway(
                    10, "gw"
                )
                world.start_mitmdump()
            result: dict[str, Any] = {}
            with console.status("request rate"):
                result.update(measure_rps(world, prof))
            with console.status("wrk"):
                result["wrk"] = measure_wrk(world, prof) if prof.wrk else None
            with console.status("SSE"):
                result["sse"] = measure_sse(world, prof)
            with console.status("big bodies"):
                result["bigbody"] = measure_bigbody(world, prof)
            with console.status("10,000 rules"):
                result["rules"] = measure_rules(world, prof)
            with console.status("keyward run start-up"):
                result["startup"] = measure_startup(world, prof)
            if compare is not None:
                with console.status(f"before/after against {compare}"):
                    result["compare"] = measure_compare(world, prof, compare)
        finally:
            procs.stop_all()
    direct, service, mitm, md = (result[p] for p in PLANES)
    result["summary"] = {
        "service_vs_direct": round(service["rps_c64"] / direct["rps_c64"], 3),
        "service_vs_mitmdump": round(service["rps_c64"] / md["rps_c64"], 3),
        "mitm_vs_mitmdump": round(mitm["rps_c64"] / md["rps_c64"], 3),
        "mitm_vs_mitmdump_c1": round(mitm["rps_c1"] / md["rps_c1"], 3),
        "mitm_vs_mitmdump_c16": round(mitm["rps_c16"] / md["rps_c16"], 3),
    }
    result["meta"] = {
        "mode": prof.name,
        "cpus": len(os.sched_getaffinity(0)),
        "pinned": int(gw_cpus is not None),
        "uvloop": int(use_uvloop),
        "seconds": round(time.monotonic() - started, 1),
        **versions(),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, under 2 minutes")
    ap.add_argument(
        "--tiny", action="store_true", help="smoke-test counts, about 30 s (wins over --quick)"
    )
    ap.add_argument("--json", metavar="OUT", type=Path, help="write the figures here")
    ap.add_argument("--uvloop", action="store_true", help="run the gateway on uvloop")
    ap.add_argument(
        "--compare",
        metavar="TREE",
        type=Path,
        help="another keyward checkout to measure interleaved with this one (before/after)",
    )
    args = ap.parse_args(argv)
    prof = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.compare is not None:
        args.compare = args.compare.resolve()
        if not (args.compare / "gateway" / "__init__.py").is_file():
            ap.error(f"--compare {args.compare}: not a keyward checkout (no gateway/ package)")
    ensure_wrk()
    result = run(prof, args.uvloop, args.compare)
    render(result)
    console.print(f"[dim]{prof.name} run, {result['meta']['seconds']} s[/]")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
