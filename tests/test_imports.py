"""The package's import graph: no circles, and library code never imports the command line.

Imports are read with `ast`, not executed, so an import inside a function counts as much as one at the top
of a module: a function-level import may keep an optional dependency (ray, fastapi) off a path, but not hide
a circle.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import expertflow

_SKIPPED = {"expertflow.__main__"}
# Import edges left out of the cycle check, each with the reason; every one must still exist (a waiver
# outliving its edge fails the test, so the list only shrinks). None today.
_WAIVED: frozenset[tuple[str, str]] = frozenset()


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: name -> (source file, is a package)."""
    found = {"expertflow": (Path(expertflow.__file__), True)}
    for info in pkgutil.walk_packages(expertflow.__path__, prefix="expertflow."):
        if info.name in _SKIPPED:
            continue
        spec = importlib.util.find_spec(info.name)
        found[info.name] = (Path(spec.origin), info.ispkg)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(name: str, source: Path, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that `name` imports anywhere in its source (top level, functions, branches)."""
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules}


def _graph(waived: frozenset[tuple[str, str]] = frozenset()) -> dict[str, set[str]]:
    """Module -> the package modules importing it runs: each import, plus the import's parent packages.

    A module's own parent packages are left out: Python has begun them before the module runs, so a package
    `__init__` that imports its own submodules is how a package is built, not a circle."""
    modules = _modules()
    names = set(modules)
    graph: dict[str, set[str]] = {}
    for name, (source, is_package) in modules.items():
        own = set(_ancestors(name))
        edges = set()
        for target in _imported(name, source, is_package, names):
            edges.add(target)
            edges.update(parent for parent in _ancestors(target) if parent not in own)
        edges.discard(name)
        graph[name] = {target for target in edges if (name, target) not in waived}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Each strongly connected component of more than one module (Tarjan): one cycle through it, as a path,
    and all its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(_path_within(graph, component), component) for component in components]


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through the component's first module, found breadth-first inside the component."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle inside {sorted(component)}")


def test_the_walk_reads_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "spec.py"
    source.write_text("import expertflow.a\n"
                      "from . import b, helper\n"
                      "from ..c import d, name\n"
                      "def later():\n"
                      "    from expertflow.e import f\n"
                      "if TYPE_CHECKING:\n"
                      "    import expertflow.g\n")
    modules = {"expertflow.a", "expertflow.p", "expertflow.p.b", "expertflow.c", "expertflow.c.d", "expertflow.e",
               "expertflow.g"}
    assert _imported("expertflow.p.spec", source, False, modules) == modules


def test_cycles_are_found_and_shown_as_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [(["a", "b", "c", "a"], {"a", "b", "c"})]


def test_no_import_cycles() -> None:
    graph = _graph()
    stale = sorted(edge for edge in _WAIVED if edge[1] not in graph.get(edge[0], ()))
    assert not stale, f"waived import edges that no longer exist; delete them from _WAIVED: {stale}"
    cycles = _cycles(_graph(_WAIVED))
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' -> '.join(path)}   (circle among {', '.join(sorted(members))})" for path, members in cycles)


def _in_cli(name: str) -> bool:
    return name == "expertflow.cli" or name.startswith("expertflow.cli.")


def test_library_code_never_imports_the_cli() -> None:
    offenders = sorted(name for name, edges in _graph().items() if not _in_cli(name) and any(map(_in_cli, edges)))
    assert not offenders, f"modules outside expertflow/cli/ importing expertflow.cli: {offenders}"
