"""The house's import rules, read from the source (AST): every import statement, at module level or inside
a function, `importlib.import_module(...)` / `__import__(...)` calls, and strings that name one of our
modules (the CLI's dispatch table, a space's config module).

Layers, lowest first: model <- kernels <- passes <- shared (files.py, metrics.py: leaves that import
nothing of ours) <- tuning <- pipeline (the rest of dsv4_compile: CLI, build, verify, export, loader, ...).
A module imports its own layer and the layers below it, never one above, and no two of our modules
import each other, directly or around a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (setup.py)
FOLDERS = {"dsv4_compile": "dsv4_compile", "model": "dsv4_compile.model", "kernels": "dsv4_compile.kernels",
           "tuning": "dsv4_compile.tuning"}
# (layer, module prefixes), lowest first; a module belongs to the layer of its longest matching prefix.
LAYERS = [("model", ("dsv4_compile.model",)), ("kernels", ("dsv4_compile.kernels",)),
          ("passes", ("dsv4_compile.passes",)), ("shared", ("dsv4_compile.files", "dsv4_compile.metrics")),
          ("tuning", ("dsv4_compile.tuning",)), ("pipeline", ("dsv4_compile",))]
# Known upward edges and cycles that another change removes; these lists only shrink (empty: none allowed).
ALLOWED_UPWARD: set[tuple[str, str]] = set()
ALLOWED_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the four source folders."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _string_prefix(node: ast.AST) -> str | None:
    """A literal module name, or the constant head of an f-string ('dsv4_compile.kernels.' for f'...{x}')."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".")
    return None


def imports_of(module: str, source: str | None = None) -> set[str]:
    """Our modules that `module` imports (its file, or `source`), by statement, call or string."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module) if node.level else node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule, else pkg itself
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                text = _string_prefix(node.args[0])
                if text and text.startswith("."):  # import_module(".x", __package__)
                    level = len(text) - len(text.lstrip("."))
                    text = _absolute(module, is_package, level, text.lstrip(".") or None)
                if text:
                    names.add(text)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("dsv4_compile."):
            names.add(node.value)
    edges = {_resolve(name) for name in names if name and name.split(".")[0] == "dsv4_compile"}
    return {e for e in edges if e and e != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def layer(module: str) -> int:
    """The index in LAYERS of `module`'s layer."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def test_the_walk_sees_every_kind_of_import():
    """In the tree: the CLI's dispatch strings, imports inside functions, relative imports."""
    assert {"dsv4_compile.build", "dsv4_compile.tune", "dsv4_compile.verify"} <= GRAPH["dsv4_compile.cli"]
    assert "dsv4_compile.verify" in GRAPH["dsv4_compile.build"]                      # inside run()
    assert "dsv4_compile.model.context" in GRAPH["dsv4_compile.tuning.tables"]      # from ..model.context
    assert len(MODULES) > 60 and all(path.is_file() for path in MODULES.values())


def test_nothing_imports_upward():
    upward = sorted((a, b) for a, targets in GRAPH.items() for b in targets
                    if layer(b) > layer(a) and (a, b) not in ALLOWED_UPWARD)
    lines = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})" for a, b in upward]
    assert not lines, "imports against the house's order:\n" + "\n".join(lines)


def test_allow_lists_only_hold_edges_that_still_exist():
    stale = [(a, b) for a, b in ALLOWED_UPWARD if b not in GRAPH.get(a, ())]
    assert not stale, f"allowed upward imports that are gone (remove them from ALLOWED_UPWARD): {stale}"
    cycles = [set(c) for c in _cycles()]
    stale_cycles = [c for c in ALLOWED_CYCLES if c not in cycles]
    assert not stale_cycles, f"allowed cycles that are gone (remove them from ALLOWED_CYCLES): {stale_cycles}"


def _cycles(graph: dict[str, set[str]] = GRAPH) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = [c for c in _cycles() if set(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles between our modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


PLANTED = """
import importlib
def later():
    from dsv4_compile.cli import main
    importlib.import_module("dsv4_compile.build")
    return __import__(f"dsv4_compile.verify{''}")
COMMAND = "dsv4_compile.loader"
"""


def test_the_walk_would_catch_a_planted_import():
    """A test that cannot fail is a defect: imports planted in a kernel module are all seen, and upward."""
    found = imports_of("dsv4_compile.kernels._common", PLANTED)
    planted = {"dsv4_compile.cli", "dsv4_compile.build", "dsv4_compile.verify", "dsv4_compile.loader"}
    assert planted <= found
    assert all(layer(m) > layer("dsv4_compile.kernels._common") for m in planted)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
