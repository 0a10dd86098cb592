"""The layering holds: no import cycle among the project's modules, the core imports no stage, one
module constructs Ray Train's ``TorchTrainer`` (``tests/test_cli.py`` checks that ``--help`` loads no torch)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mimflow", "pipeline", "tokenizer", "pretrain", "eval", "infra")
CORE, STAGES = "pipeline", {"tokenizer", "pretrain", "eval"}


def module_files() -> dict[str, Path]:
    files = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file, function bodies included)."""
    files = module_files()

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(t for n in names if (t := owner(n)) and t != mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_core_imports_no_stage_and_nothing_imports_the_app():
    graph = import_graph()
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.split(".")[0] == CORE
                for t in ts if t.split(".")[0] in STAGES | {"mimflow"})
    assert up == []
    into_app = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.split(".")[0] != "mimflow"
                      for t in ts if t.split(".")[0] == "mimflow")
    assert into_app == []


def test_one_module_constructs_torch_trainer():
    sites = sorted(str(p.relative_to(ROOT)) for p in module_files().values() if "TorchTrainer(" in p.read_text())
    assert len(sites) == 1, sites

