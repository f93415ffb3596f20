"""The package's shape: no import cycles, methods/ independent of the harness, the trainer apart from
the runner, tests importing helpers and references but never other tests, nothing cited outside
the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("harness", "methods")


def modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict) -> set[str]:
    """The package modules `path` imports, at module level or inside functions (`from a import b`
    counts b when it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_know_nothing_of_the_harness():
    bad = {m: sorted(i for i in deps if i.startswith("harness")) for m, deps in graph().items()
           if m.startswith("methods")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_trainer_imports_nothing_from_the_runner():
    edges = graph()
    assert {m: sorted(d for d in deps if d.startswith("harness.run"))
            for m, deps in edges.items() if m == "harness.train" or m.startswith("harness.train.")} == {"harness.train": [],
                                                                            "harness.train.micro": []}


@pytest.mark.parametrize("path", sorted((REPO / "tests").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_test_imports_another_test(path):
    tree = ast.parse(path.read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert not [n for n in names if re.match(r"tests\.(test_\w+|conftest)\b", n)]


def test_nothing_cites_files_outside_the_repository():
    # written in pieces, so that this file does not match itself
    pattern = re.compile("|".join(["shared" + "/spec", r"\.\./" + "shared", "/wo" + "rk/", "notes" + r"/\w+\.md"]))
    hits = [f"{p.relative_to(REPO)}:{i}" for folder in ("harness", "methods", "conf", "sweeps", "tests", "benchmarks")
            for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    hits += [f"README.md:{i}" for i, line in enumerate((REPO / "README.md").read_text().splitlines(), 1)
             if pattern.search(line)]
    assert hits == []
