"""The core's shape, checked by reading its source with ``ast``: no function in ``diffpo_serve/dllm`` longer than
80 lines, no import circle among its modules (module-level imports, the ones that run at import time), and
training importing nothing of the server but its core (``diffpo_serve.dllm``; every import, inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "diffpo_serve" / "dllm"
MAX_LINES = 80


def long_functions(folder: Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` of every function or method under ``folder`` longer than ``limit`` lines
    (decorators excluded, docstring included)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, package: str) -> set[str]:
    """The ``package`` modules a file imports when it is imported (module level, not inside functions);
    ``from a import b`` counts ``a.b`` when that is a module of the package, else ``a``."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == package or n.startswith(package + ".")}


def import_cycle(folder: Path, package: str) -> list[str] | None:
    """One cycle in the module-level import graph of ``folder``'s modules, or None. Importing ``a.b.c`` runs the
    packages ``a`` and ``a.b`` first, so an edge to a module is also an edge to each package above it (but for
    the importer's own packages, which are already under way)."""
    modules = {module_name(p): p for p in folder.rglob("*.py")}

    def with_parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & set(modules)

    # a module's own packages are already being imported when it runs: no edge to them
    graph = {name: set().union(set(), *[with_parents(t) for t in top_level_imports(path, package)])
             - with_parents(name) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (found := visit(nxt, trail + [node])):
                return found
        state[node] = 2
        return None

    return next((c for start in sorted(graph) if start not in state and (c := visit(start, []))), None)


def imports_outside(folder: Path, package: str, allowed: str) -> list[str]:
    """``path:line module`` of every import under ``folder`` (module level or inside a function) of a ``package``
    module outside ``allowed`` (``allowed`` itself and its submodules are fine; relative imports stay inside
    ``folder``)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod`: the module is pkg.mod where pkg itself is the package
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == package else [node.module]
            else:
                continue
            for name in names:
                inside = name == package or name.startswith(package + ".")
                if inside and not (name == allowed or name.startswith(allowed + ".")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_training_imports_only_the_core_of_the_server():
    assert imports_outside(ROOT / "training", "diffpo_serve", "diffpo_serve.dllm") == []


def test_the_import_check_sees_server_imports_at_any_depth(tmp_path):
    """The check itself: a module-level, a function-level and a ``from package import module`` import of the
    server are each found; imports of the core, and of names that only start like the package, are not."""
    global ROOT
    folder = tmp_path / "training"
    folder.mkdir()
    (folder / "a.py").write_text("import diffpo_serve.dllm.canvas\nfrom diffpo_serve.dllm import sampler\n"
                                 "import diffpo_server_x\nfrom diffpo_serve.protocol import APIError\n")
    (folder / "b.py").write_text("def f():\n    from diffpo_serve import paradigms, dllm\n\n"
                                 "def g():\n    import diffpo_serve\n")
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_outside(folder, "diffpo_serve", "diffpo_serve.dllm") == [
            "training/a.py:4 diffpo_serve.protocol", "training/b.py:2 diffpo_serve.paradigms",
            "training/b.py:5 diffpo_serve"]
    finally:
        ROOT = saved


def test_no_function_in_the_core_is_longer_than_80_lines():
    assert long_functions(CORE, MAX_LINES) == []


def test_the_core_has_no_import_circle():
    assert import_cycle(CORE, "diffpo_serve.dllm") is None


def test_the_checks_see_a_long_function_and_a_circle(tmp_path):
    """The checks themselves: a 81-line function and a two-module circle are found."""
    global ROOT
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n" + "    x = 1\n" * 80)
    (pkg / "b.py").write_text("import pkg.a\n\ndef g():\n    return 1\n")
    saved, ROOT = ROOT, tmp_path
    try:
        assert long_functions(pkg, MAX_LINES) == ["pkg/a.py:3 f (81 lines)"]
        assert long_functions(pkg, 81) == []
        assert import_cycle(pkg, "pkg") in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
        (pkg / "b.py").write_text("def g():\n    import pkg.a  # inside a function: runs later\n")
        assert import_cycle(pkg, "pkg") is None
    finally:
        ROOT = saved
