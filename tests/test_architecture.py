"""The layout keeps its promises: the installed library never imports the benchmark, and no
two modules import each other (directly or through a chain), counting imports inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lora_lite": ROOT / "src" / "lora_lite", "lora_bench": ROOT / "lora_bench"}


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of lora_lite / lora_bench it imports anywhere in its source}."""
    modules = {_module_name(p, d, f): f for p, d in PACKAGES.items() for f in d.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import a.b.c` names a, a.b and a.b.c
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def test_the_library_never_imports_the_benchmark():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("lora_lite")
                 for t in ts if t.startswith("lora_bench"))
    assert not bad
    code = "import sys, lora_lite; print(sorted(m for m in sys.modules if m.startswith('lora_bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import chains that come back to where they started (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    graph = import_graph()
    assert "lora_lite.runtime" in graph and "lora_bench.quality" in graph  # the walk found both trees
    assert not find_cycles(graph)


def test_a_planted_cycle_is_found():
    graph = import_graph()
    assert "lora_lite.config" in graph["lora_lite.runtime"]
    graph["lora_lite.config"].add("lora_lite.runtime")
    assert ["lora_lite.config", "lora_lite.runtime", "lora_lite.config"] in find_cycles(graph)
