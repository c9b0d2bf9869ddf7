"""The import structure of the library (``routing_env`` and ``agents``), read from the code's AST.

    python tools/structure.py            # modules, floors, arrows, cycles, the longest functions
    python tools/structure.py --json     # the same as JSON

Every import counts, deferred ones (inside a function) included: an import that runs only when a
function is called still ties the two modules together. ``tests/test_layering.py`` builds on
``import_graph`` to hold the package map.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

__all__ = ["ROOT", "PACKAGES", "modules", "import_graph", "floors", "cycles", "longest_functions"]

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("routing_env", "agents")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``dotted name -> file`` of every library module (a package by its ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.c`` -> ``a.b`` when ``c`` is a class)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for n in names:
            t = _resolve(n, known)
            if t and t != module:
                out.add(t)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> modules it imports`` (library modules only; deferred imports included)."""
    known = modules(root)
    return {m: _targets(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Floor of each module: 1 + the highest floor it imports (1 for a module importing none).

    Modules on one cycle share a floor (the cycle counts as one module)."""
    comp_of = {m: m for m in graph}
    for comp in cycles(graph):
        for m in comp:
            comp_of[m] = comp[0]
    memo: dict[str, int] = {}

    def floor(c: str, seen: frozenset = frozenset()) -> int:
        if c not in memo:
            members = [m for m in graph if comp_of[m] == c]
            below = {comp_of[t] for m in members for t in graph[m]} - {c}
            memo[c] = 1 + max((floor(b, seen | {c}) for b in below), default=0)
        return memo[c]

    return {m: floor(comp_of[m]) for m in graph}


def longest_functions(root: Path = ROOT, n: int = 5) -> list[tuple[int, str]]:
    """The ``n`` longest functions or methods: ``(lines, "module:qualname")``."""
    out = []
    for mod, path in modules(root).items():
        tree = ast.parse(path.read_text())

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.append((child.end_lineno - child.lineno + 1, f"{mod}:{prefix}{child.name}"))
                    walk(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):  # not a function itself; its methods are
                    walk(child, f"{prefix}{child.name}.")

        walk(tree, "")
    return sorted(out, reverse=True)[:n]


def summary(root: Path = ROOT) -> dict:
    graph = import_graph(root)
    fl = floors(graph)
    return {"modules": len(graph), "floors": max(fl.values()), "arrows": sum(len(t) for t in graph.values()),
            "cycles": cycles(graph), "longest_functions": longest_functions(root),
            "by_floor": {f: sorted(m for m in graph if fl[m] == f) for f in sorted(set(fl.values()), reverse=True)}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    s = summary()
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"{s['modules']} modules, {s['floors']} floors, {s['arrows']} import arrows, {len(s['cycles'])} cycle(s)")
        for c in s["cycles"]:
            print("  cycle:", " <-> ".join(c))
        for f, ms in s["by_floor"].items():
            print(f"floor {f:2d}: {', '.join(ms)}")
        print("longest functions:")
        for lines, name in s["longest_functions"]:
            print(f"  {lines:4d}  {name}")
