"""slimtune's modules import each other without cycles, and none grows past a size one reader can hold.

Only module-level imports count: an import inside a function runs at call time, when every module is loaded, so it
cannot form a cycle at import time. The graph is read from the source with `ast` (nothing is imported), so a cycle is
reported even where today's import order happens to work.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "slimtune"
PACKAGE = "slimtune"
MAX_LINES = 600

# Files allowed above MAX_LINES, each with the reason it is not split. Keep it short.
LONG_FILES: dict[str, str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at top level, or inside top-level `if`/`try`/`with` blocks
    (``if TYPE_CHECKING:`` is skipped: it never runs). Function and class bodies are not entered."""
    found = []

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if getattr(node.test, "id", getattr(node.test, "attr", None)) != "TYPE_CHECKING":
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the package's modules it imports at module level. ``from a import b`` is an edge to ``a.b`` when
    ``a.b`` is a module, else to ``a``; importing ``a.b`` also runs ``a`` (its ``__init__``), which is an edge too,
    except to a package the importer is itself in (already running when the importer runs)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    packages = {module_name(p, root) for p in root.rglob("__init__.py")}

    def with_parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        named: set[str] = set()  # the modules the import statements name
        for node in module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
                continue
            if node.level:  # relative: from the module's package (a package's own __init__ is its package)
                base = name.split(".") if name in packages else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                named.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
        # A package the importer is in counts only where it is named itself (``from slimtune.methods import NAME``).
        implied = set().union(*map(with_parents, named)) - with_parents(name)
        graph[name] = (implied | (named & files.keys())) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_cycle(tmp_path):
    """The graph follows relative imports, ``from pkg import module`` and plain ``import``; a cycle is found."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from slimtune import a\n\nimport slimtune.sub.c\n")
    (pkg / "sub" / "c.py").write_text("try:\n    from ..a import x\nexcept ImportError:\n    pass\n")
    graph = import_graph(pkg)
    assert graph["slimtune.a"] == {"slimtune.sub", "slimtune.sub.b"}
    assert graph["slimtune.sub.b"] == {"slimtune.sub.c"}  # the import inside f() is not at module level
    assert find_cycle(graph) == ["slimtune.a", "slimtune.sub.b", "slimtune.sub.c", "slimtune.a"]


def test_no_file_is_too_long():
    long = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = str(path.relative_to(ROOT.parent))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and name not in LONG_FILES:
            long[name] = n
    assert not long, f"files over {MAX_LINES} lines (split them, or add them to LONG_FILES with a reason): {long}"
    stale = [name for name in LONG_FILES if len((ROOT.parent / name).read_text().splitlines()) <= MAX_LINES]
    assert not stale, f"LONG_FILES lists files that are no longer long: {stale}"
