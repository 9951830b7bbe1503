"""A fake upstream world for `keyward run` tests: test CA, HTTPS upstreams, a config using them."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.pki import TestCA, make_ca
from tests.support.upstream import Upstream

REAL_KEY = "sk-test-REALSECRET-0123456789abcdefXYZ"
ROOT = Path(__file__).resolve().parent.parent.parent
KEYWARD = [sys.executable, "-m", "gateway"]

CONFIG = """version: 1
secrets:
  key: {{ env: TEST_API_KEY }}
egress:
  default: deny
  hosts:
    api.example.test:
      headers: {{ Authorization: "Bearer {{key}}" }}
      deny: ["DELETE /admin/**"]
    "api.example.test:8443":
      headers: {{ X-Port-Rule: "{{key}}" }}
    open.example.test: {{}}
    "*.wild.example.test":
      headers: {{ X-Wild: "{{key}}" }}
placeholders:
  TEST_API_KEY: {{ secret: key }}
upstream:
  ca_bundle: {ca}
  resolve:
    "api.example.test:443": "127.0.0.1:{port}"
    "api.example.test:8443": "127.0.0.1:{port}"
    "open.example.test:443": "127.0.0.1:{port}"
    "a.wild.example.test:443": "127.0.0.1:{port}"
    "evil.example.test:443": "127.0.0.1:{port}"
audit:
  path: audit.jsonl
"""


@dataclass
class World:
    dir: Path
    ca: TestCA
    upstream: Upstream
    config: Path

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.jsonl"

    def audit(self) -> list[dict[str, object]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
        env["TEST_API_KEY"] = REAL_KEY
        env["KEYWARD_STATE"] = str(self.dir / "state")
        env["PYTHONPATH"] = str(ROOT)
        return env

    def run_argv(self, *cmd: str) -> list[str]:
        return [*KEYWARD, "run", "-c", str(self.config), "--", *cmd]


async def make_world(tmp: Path, config_text: str = CONFIG) -> World:
    ca = make_ca(tmp / "pki")
    names = ("api.example.test", "open.example.test", "a.wild.example.test", "evil.example.test")
    upstream = await Upstream.start(ca.server_context(tmp / "pki", *names))
    config = tmp / "keyward.yaml"
    config.write_text(config_text.format(ca=ca.path, port=upstream.port))
    return World(tmp, ca, upstream, config)
