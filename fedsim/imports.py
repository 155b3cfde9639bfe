"""fedsim's own import graph, read with ast (in-function imports included), and its layering rules.

Used by ``tests/test_imports.py``; ``python -m fedsim.imports`` prints every violation. A module
is named as it is imported (``fedsim.algorithms.fedavg`` for ``algorithms/fedavg.py``).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Where each package's sources live (pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "fedsim": "fedsim",
    "fedsim.algorithms": "algorithms",
    "fedsim.scenarios": "scenarios",
    "fedsim.eval": "eval",
}

#: The modules that run, orchestrate or report a run (the "engine" of the layering rules).
ENGINE = frozenset(
    f"fedsim.{m}"
    for m in (
        "driver rounds prepare report evaluate actors pool pooled dispatch training "
        "checkpoint compare sweep bench scenario_stats resources export plots "
        "secure_round bench_secagg"
    ).split()
)
CLI = frozenset({"fedsim.cli", "fedsim.cli_eval"})


@dataclass(frozen=True)
class Import:
    """One import statement: who imports what, at which line, inside a function or not."""

    module: str
    target: str
    line: int
    in_function: bool


def sources(root: Path) -> dict[str, str]:
    """Module name → source text of every fedsim module under the repository ``root``."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "fedsim" and parts and f"fedsim.{parts[0]}" in PACKAGE_DIRS:
                continue  # not a source folder of fedsim's (fedsim/<pkg> does not exist)
            out[name] = path.read_text()
    return out


def imports(name: str, source: str, known: Iterable[str]) -> list[Import]:
    """The fedsim modules ``name`` imports (``from a import b``: ``a.b`` when that is a module)."""
    known = set(known)
    package = name if _is_package(name, source) else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(name, alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, package)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in known else base
                    found.append(Import(name, target, child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def _is_package(name: str, source: str) -> bool:
    return name in PACKAGE_DIRS or name in {
        "fedsim.data",
        "fedsim.models",
        "fedsim.privacy",
    }


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top(target: str) -> str:
    return target.split(".")[0]


def _under(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def violations(mods: Mapping[str, str]) -> list[str]:
    """Every broken layering rule and every import circle, one line each (empty: all kept)."""
    edges = [i for name, src in mods.items() for i in imports(name, src, mods)]
    out = []
    for i in edges:
        where = f"{i.module} (line {i.line}) imports {i.target}"
        if _under(i.module, "fedsim.algorithms"):
            if _top(i.target) == "ray" or i.target in ENGINE | CLI:
                out.append(
                    f"{where}: algorithms/ is pure tensor math (no Ray, no engine)"
                )
        if i.target in CLI and i.module not in CLI:
            out.append(f"{where}: only the CLI imports the CLI")
        if _under(i.module, "fedsim.eval"):
            if (
                _under(i.target, "fedsim.algorithms")
                or _under(i.target, "fedsim.scenarios")
                or i.target in ENGINE | CLI
            ):
                out.append(f"{where}: eval/ holds benchmarks and scorers only")
        if _under(i.module, "fedsim.scenarios") and i.target in ENGINE | CLI:
            out.append(f"{where}: scenarios/ never imports the engine")
        if _under(i.module, "fedsim.privacy") and (
            _top(i.target) == "ray" or i.target in ENGINE | CLI
        ):
            out.append(
                f"{where}: fedsim/privacy/ is a pure library (no Ray, no engine)"
            )
    out += [f"import circle: {' -> '.join(c)}" for c in circles(edges, set(mods))]
    return out


def circles(edges: Iterable[Import], nodes: set[str]) -> list[list[str]]:
    """The import circles among ``nodes``: one per strongly connected component of more than
    one module (Tarjan), shown as a closed path through it; a module importing itself too."""
    graph: dict[str, set[str]] = {n: set() for n in nodes}
    for i in edges:
        target = i.target
        # ``import fedsim.a.b`` loads the packages above it too; they are imported by everyone.
        if target in nodes and target != i.module:
            graph[i.module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(nodes) + 100))
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return [_cycle_through(comp, graph) for comp in comps]


def _cycle_through(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest closed path from the component's first module back to it (breadth first)."""
    inside, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(prev[chain[-1]])
                    return [*reversed(chain), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


if __name__ == "__main__":
    found = violations(sources(Path(__file__).resolve().parent.parent))
    print("\n".join(found) or "no layering violation, no import circle")
    sys.exit(1 if found else 0)
