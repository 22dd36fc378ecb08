"""Imports flow one way: no import cycle inside vhdcore, and no module imports
one of a higher layer (docs/architecture.md, "Layers and import direction").

The graph is read from the sources with :mod:`ast` (nothing is imported):
every ``import``/``from ... import`` anywhere in a module, at module level or
inside a function, relative ones resolved; ``from P import n`` is an edge to
the submodule ``P.n`` when there is one, else to ``P``.  Importing a submodule
also runs its package's ``__init__``, but that implied edge is not drawn: a
package's ``__init__`` that re-exports its own submodules is not a loop.

Run it as a script (``python tests/test_layering.py``) to print the layers,
the cycles and the violations.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "vhdcore"

#: layer of each module, by the longest matching name prefix (a package's
#: entry covers its submodules).  A module may import its own layer and the
#: ones below, never a higher one.  When a module moves or a new one comes,
#: give it its place here.
LAYERS: dict[str, int] = {
    # 0: the base every layer may use
    "vhdcore.errors": 0, "vhdcore._io": 0, "vhdcore._args": 0, "vhdcore._util": 0,
    "vhdcore._version": 0,
    # 1: the on-disk format and the layout of new files, no I/O; the kernel, its
    # twin and their selector (buffers only: they import nothing of vhdcore, so
    # the file layer may use them)
    "vhdcore.vhd": 1, "vhdcore.vhd.format": 1, "vhdcore.vhd.layout": 1,
    "vhdcore.format": 1,  # re-exports vhd.format (the documented import path)
    "vhdcore.kernels": 1, "vhdcore._merge": 1, "vhdcore._merge_py": 1,
    # 2: one VHD file: read, write, create, inspect; reads through layers
    "vhdcore.vhd.file": 2, "vhdcore.vhd.write": 2, "vhdcore.vhd.create": 2,
    "vhdcore.vhd.inspect": 2, "vhdcore.vhd.overlay": 2,
    # 3: the chain and its parent resolution, check; the merged block stream
    # and the flat writer, which the chain's cat -o (Chain.copy_to_raw,
    # iter_raw) uses
    "vhdcore.chain": 3, "vhdcore.parents": 3, "vhdcore.check": 3,
    "vhdcore.ops.stream": 3, "vhdcore.ops.flatwrite": 3,
    # re-exports vhd.file, vhd.create, vhd.inspect and chain.vhd_to_raw (the
    # documented import path); nothing in vhdcore imports it
    "vhdcore.disk": 3,
    # 4: operations over a chain (vhdcore.coalesce re-exports them)
    "vhdcore.ops": 4, "vhdcore.coalesce": 4, "vhdcore.fsmap": 4, "vhdcore._fs": 4, "vhdcore.compress": 4,
    "vhdcore.estimate": 4, "vhdcore._workloads": 4,
    # 5: the pipeline and the stores
    "vhdcore.store": 5, "vhdcore.imaging": 5, "vhdcore.repo": 5, "vhdcore.fleet": 5,
    # 6: front ends
    "vhdcore.cli": 6, "vhdcore.bench": 6, "vhdcore.demo": 6, "vhdcore.__main__": 6,
    # 7: the package itself, which re-exports the public API of every layer
    "vhdcore": 7,
}

#: known edges that break the rule, each with the task that removes it.  The
#: test fails on any edge that is not listed, and on a listed one that is gone
#: (so the list only shrinks).  Empty since the format package (vhd/) and the
#: operations (ops/) got their homes.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the vhdcore modules it imports (anywhere in its body)."""
    mods = modules()
    known = set(mods) | {"vhdcore._merge"}  # the compiled kernel (its .pyx/.pyi)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            for t in targets:
                while t and t not in known:  # import a.b.c of a non-module attribute
                    t = t.rpartition(".")[0]
                if t.startswith("vhdcore") and t != mod:
                    graph[mod].add(t)
    return graph


def layer_of(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len,
               default=None)
    if best is None:
        raise KeyError(f"{mod} has no layer: add it to LAYERS in tests/test_layering.py")
    return LAYERS[best]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, bs in graph.items() for b in bs if layer_of(a) < layer_of(b)}


def _cycle_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for comp in cycles(graph) for a in comp for b in graph[a] if b in comp}


pytestmark = pytest.mark.skipif(not PKG.is_dir(), reason="the sources are not beside the tests")


def test_every_module_has_a_layer() -> None:
    for mod in modules():
        layer_of(mod)


def test_no_import_cycle() -> None:
    graph = import_graph()
    # an allowed edge is ignored here too: the cycles it closes are phase-2 work
    pruned = {a: {b for b in bs if (a, b) not in ALLOWED} for a, bs in graph.items()}
    assert cycles(pruned) == [], (
        "import cycle(s) among vhdcore modules; each edge inside one: "
        f"{sorted(_cycle_edges(pruned))}")


def test_no_import_goes_up_a_layer() -> None:
    bad = {e for e in upward_edges(import_graph()) if e not in ALLOWED}
    assert not bad, "lower layer imports a higher one (fix it, or move the module in LAYERS): " + \
        ", ".join(f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})" for a, b in sorted(bad))


def test_allowlist_only_shrinks() -> None:
    graph = import_graph()
    gone = [e for e in ALLOWED if e[1] not in graph.get(e[0], set())]
    assert not gone, f"allowed edges no longer in the code: remove them from ALLOWED: {gone}"


def test_the_walk_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The walk is not blind: a relative import inside a function, from a low
    layer to a high one, is an edge, an upward one and (with its way back) a cycle."""
    graph = import_graph()
    assert "vhdcore.vhd.file" in graph["vhdcore.chain"]  # a module-level relative import
    tree = ast.parse("def f():\n    from .cli import main\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("vhdcore.format", False, node) == "vhdcore.cli"
    fake = {"vhdcore.format": {"vhdcore.cli"}, "vhdcore.cli": {"vhdcore.format"}}
    assert upward_edges(fake) == {("vhdcore.format", "vhdcore.cli")}
    assert cycles(fake) == [["vhdcore.cli", "vhdcore.format"]]


if __name__ == "__main__":
    g = import_graph()
    for m in sorted(g, key=lambda m: (layer_of(m), m)):
        print(layer_of(m), m)
    print("cycles:")
    for c in cycles(g):
        print("  ", c)
        print("     edges:", sorted((a, b) for a in c for b in g[a] if b in c))
    print("upward:")
    for a, b in sorted(upward_edges(g)):
        print(f"   {a} ({layer_of(a)}) -> {b} ({layer_of(b)})",
              "[allowed]" if (a, b) in ALLOWED else "")
