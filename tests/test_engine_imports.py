"""`gateway.engine` is a plain Docker/Podman client: it imports the standard library, aiohttp and
itself, never the rest of keyward (pairs, config, CLI), so it can be reused or split out as is."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import gateway.engine

ENGINE_DIR = Path(gateway.engine.__file__).parent
ALLOWED_THIRD_PARTY = {"aiohttp"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, at any depth (function-level
    imports count too)."""
    package = "gateway.engine"
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from gateway import pair` imports gateway.pair
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def outside_imports(path: Path) -> list[str]:
    bad = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top == "__future__" or top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY:
            continue
        if module == "gateway.engine" or module.startswith("gateway.engine."):
            continue
        bad.append(f"{path.name}:{line}: {module}")
    return bad


def test_engine_imports_nothing_else_of_keyward() -> None:
    modules = sorted(ENGINE_DIR.glob("*.py"))
    assert len(modules) >= 5  # the client, discovery, errors, stream, service at least
    bad = [b for m in modules for b in outside_imports(m)]
    assert bad == [], "gateway.engine must not import outside itself:\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The check itself: each way of importing keyward from the engine package is caught."""
    src = tmp_path / "m.py"
    src.write_text(
        "import gateway.cli.errors\n"
        "from gateway import pair\n"
        "from gateway.config.loader import load_config\n"
        "from .. import kube\n"
        "def f():\n"
        "    from gateway.pair.spec import PairOptions\n"
        "import json, aiohttp\n"
        "from gateway.engine.errors import EngineError\n"
        "from . import stream\n"
    )
    assert [b.split(": ", 1)[1] for b in outside_imports(src)] == [
        "gateway.cli.errors",
        "gateway.pair",
        "gateway.config.loader.load_config",
        "gateway.kube",
        "gateway.pair.spec.PairOptions",
    ]
