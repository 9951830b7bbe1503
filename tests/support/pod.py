"""A pod world for namespace tests: a real `keyward serve` pod (gateway as the proxy uid, agent
as another uid) wired by veth to an upstream namespace running the fake upstream on
documentation addresses. Needs root; callers mark their tests `root`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.pod.isolate import IsolatedPod
from gateway.pod.netns import Topology
from tests.support.upstream import start_in_namespace

ROOT = Path(__file__).resolve().parents[2]
API, OTHER, V6 = "203.0.113.10", "203.0.113.11", "2001:db8:1::10"


@dataclass
class PodWorld:
    topo: Topology
    pod: IsolatedPod
    base: Path
    upstream_log: Path

    def agent(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.pod.run_agent(list(argv), timeout=timeout)

    def seen(self) -> list[dict[str, object]]:
        if not self.upstream_log.exists():
            return []
        return [json.loads(x) for x in self.upstream_log.read_text().splitlines() if x]

    def audit(self) -> list[dict[str, object]]:
        path = self.base / "audit.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x]


@contextlib.contextmanager
def pod_world(config: str, names: Iterable[str], env: dict[str, str]) -> Iterator[PodWorld]:
    """Start the pod with `config` (a template: {ca}, {api}, {other}, {audit}); the upstream
    namespace serves `names` on API, OTHER and V6. `env` is added to the gateway's environment."""
    base = Path(tempfile.mkdtemp(prefix="keyward-podtest-"))
    base.chmod(0o755)
    up_dir = base / "upstream"
    up_dir.mkdir()
    try:
        with Topology() as topo:
            start_in_namespace(topo.upstream, up_dir, [API, OTHER, V6], list(names))
            path = base / "keyward.yaml"
            path.write_text(
                config.format(
                    ca=up_dir / "pki" / "test-ca.pem", api=API, other=OTHER,
                    audit=base / "audit.jsonl",
                )
            )  # fmt: skip
            pod = IsolatedPod(topo.pod, path, base / "state", work=base / "pod")
            pod.start(env={**os.environ, **env})
            try:
                yield PodWorld(topo, pod, base, up_dir / "seen.jsonl")
            finally:
                pod.stop_gateway()
    finally:
        shutil.rmtree(base, ignore_errors=True)
