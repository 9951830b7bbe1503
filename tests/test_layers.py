"""Layers import downward only. The order is the README's layout table (one source for readers
and for this test); an import that reaches a higher layer, anywhere in a module (function-level
and type-checking imports included: they are how cycles hide), fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ROW = re.compile(r"^\| (\d+) \| (.+?) \|")


def layer_table(readme: str) -> dict[str, int]:
    """`gateway/...` path (a file, or a directory ending in `/`) -> its layer."""
    out: dict[str, int] = {}
    for line in readme.splitlines():
        m = _ROW.match(line)
        if m:
            for path in re.findall(r"`(gateway/[^`]*)`", m.group(2)):
                out[path] = int(m.group(1))
    return out


def layer_of(path: str, table: dict[str, int]) -> int | None:
    """The layer of a file: its own row, else the row of the deepest directory holding it."""
    if path in table:
        return table[path]
    dirs = [d for d in table if d.endswith("/") and path.startswith(d)]
    return table[max(dirs, key=len)] if dirs else None


def module_file(module: str, root: Path) -> str | None:
    """`gateway.a.b` -> `gateway/a/b.py` or `gateway/a/b/__init__.py`, as found under `root`."""
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def imported_files(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, file) of every gateway module a file imports, wherever the import statement is."""
    rel = path.relative_to(root)
    package = ".".join(rel.parent.parts)
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from gateway import pair` names a module; `from gateway.x import y` a name in x
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.append(sub if module_file(sub, root) is not None else base)
        for name in names:
            if name == "gateway" or name.startswith("gateway."):
                found = module_file(name, root)
                if found is not None:
                    out.append((node.lineno, found))
    return sorted(set(out))


def upward_imports(root: Path, table: dict[str, int]) -> list[str]:
    bad = []
    for path in sorted((root / "gateway").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        mine = layer_of(rel, table)
        if mine is None:
            bad.append(f"{rel}: in no layer of the README's layout table")
            continue
        for line, target in imported_files(path, root):
            theirs = layer_of(target, table)
            if theirs is not None and theirs > mine:
                bad.append(f"{rel}:{line}: layer {mine} imports {target} (layer {theirs})")
    return bad


def test_no_module_imports_from_a_layer_above_it() -> None:
    table = layer_table((ROOT / "README.md").read_text())
    assert len(set(table.values())) >= 8, table
    bad = upward_imports(ROOT, table)
    assert bad == [], "imports that reach up a layer:\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_upward_import(tmp_path: Path) -> None:
    """Each way of importing from above is caught: absolute, relative, `from gateway import
    module`, and inside a function; a module in no layer is reported too."""
    for name, text in {
        "gateway/__init__.py": "",
        "gateway/low/__init__.py": "",
        "gateway/low/a.py": (
            "import gateway.high.b\n"
            "from gateway.high import b\n"
            "from gateway import high\n"
            "from ..high.b import X\n"
            "def f():\n"
            "    from gateway.high.b import Y\n"
            "from gateway.low import c\n"
            "import json\n"
        ),
        "gateway/low/c.py": "from gateway.high.special import Z\n",
        "gateway/high/__init__.py": "",
        "gateway/high/b.py": "from gateway.low.a import f\n",
        "gateway/high/special.py": "",
        "gateway/stray.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    table = layer_table(
        "| 1 | `gateway/low/`, `gateway/__init__.py`, `gateway/high/special.py` | x |\n"
        "| 2 | `gateway/high/` | y |\n"
    )
    assert upward_imports(tmp_path, table) == [
        "gateway/low/a.py:1: layer 1 imports gateway/high/b.py (layer 2)",
        "gateway/low/a.py:2: layer 1 imports gateway/high/b.py (layer 2)",
        "gateway/low/a.py:3: layer 1 imports gateway/high/__init__.py (layer 2)",
        "gateway/low/a.py:4: layer 1 imports gateway/high/b.py (layer 2)",
        "gateway/low/a.py:6: layer 1 imports gateway/high/b.py (layer 2)",
        "gateway/stray.py: in no layer of the README's layout table",
    ]
