"""List the import cycles between lungcad's modules (tests/test_structure.py fails on any).

    python scripts/import_cycles.py [SRC]     # SRC defaults to src/lungcad; exit status 1 on a cycle

The graph is read from the source with `ast`, nothing is imported. Every import counts, wherever it
is written: at the top, inside a function (a lazy import hides a cycle, it does not remove it) or
under `if TYPE_CHECKING:` (a cycle in the design even when Python never executes it).
`from pkg import name` is an edge to the submodule `pkg.name` when that is a module, otherwise to
`pkg` itself. Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`, but those implicit
edges are left out: they would make every package with re-exports in its `__init__` look cyclic.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

__all__ = ["find_cycles", "import_graph"]

ROOT = Path(__file__).resolve().parents[1]


def _module_names(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder `src`."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(tree: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `module`'s source imports, anywhere in the file."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` / `from ..a import b`
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            targets = [f"{parent}.{a.name}" if f"{parent}.{a.name}" in known else parent for a in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` where only `a.b` is ours (or an attribute path): the longest known prefix
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


def import_graph(src: str | Path = ROOT / "src" / "lungcad") -> dict[str, set[str]]:
    """module -> the package's own modules it imports (every import statement in the file)."""
    known = _module_names(Path(src))
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = _imported(tree, name, path.name == "__init__.py", known)
    return graph


def find_cycles(src: str | Path = ROOT / "src" / "lungcad") -> list[list[str]]:
    """One cycle (a, b, ..., a) per strongly connected component of the import graph, sorted."""
    graph = import_graph(src)
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            cycles.append(_a_cycle(graph, component))
    return sorted(cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep import chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in strongly connected {sorted(component)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cycles = find_cycles(*argv[:1])
    for cycle in cycles:
        print(" -> ".join(cycle))
    print(f"{len(cycles)} import cycle(s)", file=sys.stderr)
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
