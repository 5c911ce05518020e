# SPDX-License-Identifier: Apache-2.0
"""The package's import structure, read from the source with ast (nothing is imported): no
import cycle among packed_kernels' modules, and the kernel layers (packed_kernels/triton/, the
csrc bindings) never import the ops above them."""

import ast
import re
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "packed_kernels"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(importer: str, node: ast.AST) -> List[str]:
    """The packed_kernels modules an import statement loads: `from pkg import sub` loads the
    submodule `pkg.sub` when there is one, else `pkg` itself."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _resolve(importer, node)
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                 for alias in node.names]
    return [n for n in names if n in MODULES]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body, at_import_time: bool):
    """Import statements in `body`: those run at import time (module and class bodies, their
    if/try/with blocks), or every one, function bodies included."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not at_import_time:
                yield from _statements(node.body, at_import_time)
        elif isinstance(node, ast.If) and at_import_time and _is_type_checking(node):
            yield from _statements(node.orelse, at_import_time)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _statements(getattr(node, field, []) or [], at_import_time)


def _imports(module: str, at_import_time: bool) -> Set[str]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    return {target for node in _statements(tree.body, at_import_time)
            for target in _imported(module, node) if target != module}


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_reader_sees_the_package():
    """Guards the checks below against reading nothing: known modules and known edges."""
    assert {"packed_kernels", "packed_kernels.ops.conv", "packed_kernels.triton.conv"} <= set(MODULES)
    assert "packed_kernels.ops.conv" in _imports("packed_kernels", at_import_time=True)
    assert "packed_kernels._backend" in _imports("packed_kernels.ops.conv", at_import_time=True)


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    """An import cycle leaves a module half-initialised for whichever side runs second; edges
    are the imports run at import time (function bodies import lazily, after every module is
    complete, so they are left out)."""
    graph = {module: _imports(module, at_import_time=True) for module in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("packed_kernels.triton")))
def test_triton_kernels_never_import_the_ops(module):
    """The kernel layer sits below the ops: packed_kernels/triton/ imports neither ops/ nor the
    modules built on them (nn/, models/), at import time or inside functions."""
    above = ("packed_kernels.ops", "packed_kernels.nn", "packed_kernels.models")
    bad = sorted(t for t in _imports(module, at_import_time=False) if t.startswith(above) or t == "packed_kernels")
    assert not bad, f"{module} imports {bad}"


def test_csrc_bindings_never_import_python_ops():
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    assert any(p.name == "bindings.cpp" for p in sources)
    pattern = re.compile(r"import\s*\(\s*\"packed_kernels")
    offenders = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text(errors="replace"))]
    assert not offenders, f"csrc sources importing packed_kernels Python modules: {offenders}"
