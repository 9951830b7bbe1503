"""How long a large config takes: `keyward check` and `keyward serve` (start to ready) on a
config of N host rules (tests/support/configs.py: five rule shapes, one in five injecting a
credential), wall and CPU seconds, and peak RSS.

    python scripts/bench_config.py [--hosts N] [--plain] [--runs R] [--compare TREE]

`--plain`: every rule a plain `host: {}` (an allow list), instead of the five shapes.

`--compare TREE` measures another checkout of keyward (with its own .venv) the same way,
alternating runs. Everything stays on 127.0.0.1 (serve binds loopback ports, no netfilter).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.configs import big_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _python(tree: Path) -> str:
    venv = tree / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _run(argv: list[str], cwd: Path, ready: Path | None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one command; with `ready`, until that file exists."""
    env = {**os.environ, "TOK": "bench-token", "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    if ready is not None:
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"{argv[3]} exited with {proc.returncode} before it was ready")
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.terminate()
    _, status, usage = os.wait4(proc.pid, 0)
    if ready is None:
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(argv[3:])} failed")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def measure(tree: Path, config: Path, work: Path) -> dict[str, tuple[float, float, float]]:
    py = _python(tree)
    check = _run([py, "-m", "gateway", "check", "-c", str(config)], tree, None)
    ready = work / "ready"
    ready.unlink(missing_ok=True)
    ports = [str(_free_port()) for _ in range(3)]
    serve = _run(
        [
            py,
            "-m",
            "gateway",
            "serve",
            "-c",
            str(config),
            "--no-netfilter",
            "--proxy-uid",
            str(os.getuid()),
            "--explicit-port",
            ports[0],
            "--transparent-port",
            ports[1],
            "--dns-port",
            ports[2],
            "--state",
            str(work / "state"),
            "--ready-file",
            str(ready),
            "--audit",
            str(work / "audit.jsonl"),
        ],
        tree,
        ready,
    )
    return {"check": check, "serve": serve}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=200_000)
    ap.add_argument("--plain", action="store_true", help="every rule a plain `host: {}`")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", type=Path, metavar="TREE")
    args = ap.parse_args()
    trees = {"this": ROOT} | ({"compare": args.compare.resolve()} if args.compare else {})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "keyward.yaml"
        config.write_text(big_config(args.hosts, plain=args.plain))
        print(
            f"{args.hosts} hosts, {config.stat().st_size / 2**20:.1f} MiB, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        results: dict[str, dict[str, list[tuple[float, float, float]]]] = {
            name: {"check": [], "serve": []} for name in trees
        }
        for _ in range(args.runs):
            for name, tree in trees.items():
                for what, figures in measure(tree, config, work).items():
                    results[name][what].append(figures)
        for name, per in results.items():
            for what, runs in per.items():
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                rss = max(r[2] for r in runs)
                print(f"{name:8} {what:6} wall {wall:6.2f} s  cpu {cpu:6.2f} s  rss {rss:5.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
