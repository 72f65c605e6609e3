"""Report the import circles in the project's packages, imports inside functions included.

A circle is a set of modules each of which reaches every other one through imports (a strongly
connected component of the import graph with more than one module). The graph is grimp's, the
one import-linter checks contracts against: it reads every ``import`` statement of a module,
those inside functions too, so a circle that only a lazy import closes still counts.

    python scripts/import_cycles.py                 # recipe and sandbox; exit 1 if any circle
    python scripts/import_cycles.py recipe.retool   # one package
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence

PACKAGES = ("recipe", "sandbox")


def import_graph(packages: Sequence[str]) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports (anywhere in its body)."""
    import grimp

    graph = grimp.build_graph(*packages, include_external_packages=False, cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


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
    sys.exit(main())
