"""The modules of src/gearshift import each other one way: no import circles, hidden ones included.

Every module is parsed with ``ast`` (nothing is imported), and every import that can run counts: at module level,
inside functions and methods (the usual way to hide a circle), relative imports resolved against the package, a
package ``__init__``'s lazy re-exports (its ``_LAZY`` name -> submodule table) and module names written as strings
(``importlib.import_module``, the command line's ``EXTENSIONS``). Imports under ``if TYPE_CHECKING:`` do not count:
they never run, so they neither order imports nor load a floor above at run time (they only name a type).
Importing ``a.b`` also runs ``a/__init__``; that implicit edge is not counted, or every re-exporting package would
be a circle with its own submodules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "gearshift"


def modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module of the package."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (they name modules in prose, not imports)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    mods = modules(src)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, is_package) in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = _docstrings(tree)

        def add(target: str, name: str = name) -> None:
            if target in mods and target != name:
                graph[name].add(target)

        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module) if node.level else node.module or ""
                for alias in node.names:
                    # ``from pkg import sub`` imports the submodule; ``from pkg import name`` runs pkg/__init__
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
            elif (
                is_package
                and isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
                and isinstance(node.value, ast.Dict)
            ):
                for value in node.value.values:  # lazy re-exports: name -> submodule, imported on first access
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        add(f"{name}.{value.value}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                # a module named as a string: import_module("gearshift.x"), EXTENSIONS; dotted names only, since
                # a bare "gearshift" is the program's name in messages far more often than an import
                add(node.value if "." in node.value else "")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan), each a set of modules in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.add(w)
                if w == v:
                    break
            if len(members) > 1:
                found.append(frozenset(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, set[str]], members: frozenset[str]) -> str:
    """One circle through the first of ``members``, written ``a -> b -> a``, for the failure message."""
    start = min(members)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return " -> ".join([*path, start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # the greedy walk met a visited module: name the whole set instead
            return "circle among " + ", ".join(sorted(members))
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_graph_sees_hidden_and_lazy_imports() -> None:
    """The parser is not vacuous: it finds imports of each kind that the no-circle test relies on."""
    graph = import_graph()
    assert len(graph) > 50
    assert "gearshift.checkpoint" in graph["gearshift.model"]  # module level
    assert "gearshift.generation" in graph["gearshift.model"]  # inside a method (Supernet.generate)
    assert "gearshift.config" in graph["gearshift.search.cli"]  # inside a function, two dots
    assert "gearshift.model" in graph["gearshift"]  # a package's lazy re-export (_LAZY)
    assert "gearshift.search.cli" in graph["gearshift.cli"]  # a module named as a string (EXTENSIONS)
    assert "gearshift.model" not in graph["gearshift.generation"]  # under `if TYPE_CHECKING:` only


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles in src/gearshift:\n" + "\n".join(describe(graph, c) for c in found)
