"""The package tree is the trust boundary: these tests keep the code, the layering and docs/architecture.md
in step, so the document cannot drift from the imports again.

- every module has exactly one row in docs/architecture.md's module table, and every row names a module;
- every cbatch import a module makes (module level or inside a function) is listed in its row;
- the layers only point one way (core imports nothing above it; clients and admin tools never import the
  daemon; only the daemon, admin tools and the emulator reach an engine; the runtime never imports the
  emulator);
- there is no import circle, counting function-level imports too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "cbatch"
DOC = ROOT / "docs" / "architecture.md"

# Which top-level parts of the package each part may import (itself included where listed).
LAYERS = {
    "core": {"core"},
    "protocol": {"core", "host"},
    "host": {"core", "host"},
    "engines": {"core", "host", "engines"},
    "clients": {"core", "host", "protocol", "clients"},
    "daemon": {"core", "host", "protocol", "engines", "daemon"},
    "admin": {"core", "host", "protocol", "clients", "engines", "admin"},
    "emulator": {"core", "host", "protocol", "clients", "admin", "emulator"},
    "cli": {"core"},
    "__init__": set(),
}


def module_name(path: Path) -> str:
    """Dotted name below ``cbatch`` ("daemon.server"; a package's ``__init__`` is the package itself)."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = modules()


def imports_of(path: Path) -> set[str]:
    """Every cbatch module ``path`` imports, at any depth of the file (function-level imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (use absolute cbatch.* imports)")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cbatch":
            base = node.module[len("cbatch"):].lstrip(".")
            for alias in node.names:
                cand = f"{base}.{alias.name}" if base else alias.name
                found.add(cand if cand in MODULES else base or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cbatch":
                    found.add(alias.name[len("cbatch"):].lstrip(".") or "__init__")
    if PKG in path.parents:
        found.discard(module_name(path))
    return found


def layer(name: str) -> str:
    return name.split(".")[0] if name else "__init__"


def doc_table() -> dict[str, set[str]]:
    """``{module: allowed imports}`` from the rows ``| `cbatch/x/y.py` | ... | `a.b`, `c` |`` of the doc."""
    rows: dict[str, set[str]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`cbatch/([\w/]+)\.py`\s*\|(.*)\|\s*$", line)
        if not m:
            continue
        name = m.group(1).replace("/", ".")
        if name.endswith("__init__"):
            name = name[: -len(".__init__")] or "__init__"
        assert name not in rows, f"docs/architecture.md lists {name} twice"
        last = m.group(2).split("|")[-1]
        allowed = set(re.findall(r"`([\w.]+)`", last))
        rows[name] = {a for a in allowed if a != "stdlib"}
    return rows


def test_every_module_has_one_row_and_every_row_a_module():
    rows = doc_table()
    documented = set(rows)
    code = {m for m in MODULES if not MODULES[m].name == "__init__.py" or m == "__init__"}
    assert sorted(code - documented) == [], "modules missing from docs/architecture.md"
    assert sorted(documented - set(MODULES)) == [], "docs/architecture.md rows naming no module"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_match_the_table(name):
    rows = doc_table()
    if MODULES[name].name == "__init__.py" and name != "__init__":
        assert imports_of(MODULES[name]) == set(), f"{name}/__init__.py imports modules (keep it empty)"
        return
    extra = sorted(imports_of(MODULES[name]) - rows.get(name, set()))
    assert extra == [], f"cbatch/{name.replace('.', '/')}.py imports {extra}: not in its docs/architecture.md row"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_point_one_way(name):
    allowed = LAYERS[layer(name)]
    wrong = sorted(d for d in imports_of(MODULES[name]) if layer(d) not in allowed and d != "__init__")
    assert wrong == [], f"{name} ({layer(name)}) may import only {sorted(allowed)}; imports {wrong}"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (a list that starts and ends with the same module), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circles():
    graph = {m: imports_of(p) & set(MODULES) for m, p in MODULES.items()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_runtime_never_imports_the_emulator():
    runtime = [m for m in MODULES if layer(m) not in ("emulator", "cli")]
    offenders = sorted(m for m in runtime if any(layer(d) == "emulator" for d in imports_of(MODULES[m])))
    assert offenders == []


def test_detects_a_circle(tmp_path):
    """The checks themselves can fail: function-level imports are seen and a circle is found."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from cbatch.daemon import server\n")
    assert imports_of(a) == {"daemon.server"}
    assert find_circle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_circle({"x": {"y"}, "y": set()}) is None
