"""docs/ ships the contract: the generated pages match the code, the audit page matches the
writer, and every relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gateway.audit.writer import AuditRecord
from gateway.cli.reference import PACKAGE_RENDERERS, PACKAGE_ROOT, RENDERERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_generated_page_is_current(name: str) -> None:
    assert (DOCS / name).read_text(encoding="utf-8") == RENDERERS[name](), (
        f"docs/{name} is stale: run `python -m gateway.cli.reference docs`"
    )


@pytest.mark.parametrize("rel", sorted(PACKAGE_RENDERERS))
def test_generated_package_file_is_current(rel: str) -> None:
    assert (PACKAGE_ROOT / rel).read_text(encoding="utf-8") == PACKAGE_RENDERERS[rel](), (
        f"gateway/{rel} is stale: run `python -m gateway.cli.reference docs`"
    )


def test_shipped_schema_validates_the_example_config() -> None:
    import json

    import jsonschema
    import yaml

    schema = json.loads((PACKAGE_ROOT / "config/keyward.schema.json").read_text())
    example = yaml.safe_load((ROOT / "examples/keyward.yaml").read_text())
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "egres": {}}, schema)


def test_audit_page_lists_exactly_the_record_fields() -> None:
    text = (DOCS / "audit.md").read_text(encoding="utf-8").split("\n## Reasons\n", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", text, re.M)
    assert documented == [f.name for f in dataclasses.fields(AuditRecord)]


def test_every_relative_link_resolves() -> None:
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    assert "DESIGN.md" not in (ROOT / "README.md").read_text(encoding="utf-8")
