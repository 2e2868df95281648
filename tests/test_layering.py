"""The package's imports point one way: HTTP routes -> serving core -> engines, with no circle
among modules (type-only imports included: they are dependencies for a reader too)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import llmserve

ROOT = Path(llmserve.__file__).parent
# A layer may import those to its right, never those to its left.
LAYERS = ("api", "serving", "engines")


def _modules() -> dict[str, Path]:
    return {
        ".".join(("llmserve", *f.relative_to(ROOT).with_suffix("").parts)).removesuffix(
            ".__init__"): f
        for f in ROOT.rglob("*.py")
    }


def _imports(path: Path, modules: set[str]) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from (n for n in names if n in modules)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: set(_imports(p, set(modules))) - {m} for m, p in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_layer_imports_one_above_it():
    upward = [
        (m, d) for m, deps in _graph().items() for d in deps
        if (a := _layer(m)) is not None and (b := _layer(d)) is not None and b < a
    ]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    # Tarjan's strongly connected components: a circle is one of more than one module.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    # The two checks above must be able to fail: they read real imports.
    modules = {"llmserve.serving.a", "llmserve.engines.b", "llmserve.api.c"}
    engine = tmp_path / "b.py"
    engine.write_text("from llmserve.serving.a import x\nimport llmserve.api.c\n")
    assert sorted(_imports(engine, modules)) == ["llmserve.api.c", "llmserve.serving.a"]
    assert _layer("llmserve.engines.b") > _layer("llmserve.serving.a") > _layer("llmserve.api.c")
