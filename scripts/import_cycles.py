"""Report the import circles in the project's packages, imports inside functions included.

A circle is a set of modules each of which reaches every other one through imports (a strongly
connected component of the import graph with more than one module). The graph is grimp's, the
one import-linter checks contracts against: it reads every ``import`` statement of a module,
those inside functions too, so a circle that only a lazy import closes still counts. A program
directory inside a package (a ``__main__.py`` and no ``__init__.py``, run as ``python dir``, such
as ``sandbox/zygote/``) is no package to grimp: its modules import each other by bare name, and
those imports are read here the same way.

    python scripts/import_cycles.py                 # recipe and sandbox; exit 1 if any circle
    python scripts/import_cycles.py recipe.retool   # one package
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

PACKAGES = ("recipe", "sandbox")


def import_graph(packages: Sequence[str]) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports (anywhere in its body)."""
    import grimp

    graph = grimp.build_graph(*packages, include_external_packages=False, cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def program_dirs(packages: Sequence[str]) -> list[Path]:
    """Directories under ``packages`` run as programs: a ``__main__.py``, no ``__init__.py``."""
    found = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        for root in spec.submodule_search_locations or []:
            for main in sorted(Path(root).rglob("__main__.py")):
                if not (main.parent / "__init__.py").exists():
                    found.append(main.parent)
    return found


def program_graph(directory: Path) -> dict[str, set[str]]:
    """``dir:module`` -> the sibling modules it imports by bare name (anywhere in its body)."""
    siblings = {path.stem for path in directory.glob("*.py")}
    graph = {}
    for path in sorted(directory.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[f"{directory.name}:{path.stem}"] = {
            f"{directory.name}:{name}" for name in imported & siblings if name != path.stem
        }
    return graph


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted, largest first
    (Tarjan's algorithm, iterative: no recursion limit on a deep chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES))
    args = parser.parse_args(argv)
    graph = import_graph(args.packages)
    for directory in program_dirs(args.packages):
        graph |= program_graph(directory)
    found = circles(graph)
    members = sum(len(c) for c in found)
    print(
        f"{len(found)} import circle(s), {members} module(s) in them, "
        f"{len(graph)} module(s) in {', '.join(args.packages)}"
    )
    for number, circle in enumerate(found, 1):
        print(f"circle {number} ({len(circle)} modules): {' '.join(circle)}")
    return 1 if found else 0


if __name__ == "__main__":
    # this checkout's packages, as lint-imports reads them, not a copy installed elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
