"""The package layout: one subpackage per stage, imports in one direction, no cycles.

Every import statement counts, at module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edge_rnn"

# What each part of edge_rnn may import from the others (besides itself). The device path stands alone; export is
# a converter library the adapters (models) use; the stages (exporter, quantize, bundle, bench, check, pipeline)
# sit on top (check judges a folder's quantized variant at the bound the bundle stage stores for it); only cli (and
# __main__) import cli.
ALLOWED = {
    "edge_rnn": {"device", "errors"},
    "errors": set(),
    "tolerances": set(),
    "config": set(),
    "device": {"errors", "tolerances"},
    "train": {"config", "device", "errors", "tolerances"},
    "export": {"config", "device", "errors", "tolerances"},
    "models": {"config", "device", "errors", "export", "tolerances", "train"},
    "evaluate": {"device", "errors", "models", "tolerances"},
    "accuracy_aware": {"device", "errors", "evaluate", "export", "tolerances"},
    "exporter": {"config", "device", "errors", "evaluate", "export", "models", "tolerances"},
    "quantize": {"accuracy_aware", "config", "device", "errors", "evaluate", "export", "models", "tolerances"},
    "bundle": {"config", "device", "errors", "evaluate", "export", "models", "tolerances"},
    "bench": {"config", "device", "errors", "evaluate", "export", "models", "quantize", "tolerances", "train"},
    "check": {"bench", "bundle", "config", "device", "errors", "evaluate", "models", "tolerances"},
    "pipeline": {"config", "device", "errors", "export", "exporter", "quantize", "tolerances", "train"},
    "cli": {"bench", "bundle", "check", "config", "device", "errors", "evaluate", "export", "exporter", "pipeline",
            "quantize", "train"},
    "__main__": {"cli"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """edge_rnn module → the edge_rnn modules it imports."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) if node.level \
                    else node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "edge_rnn"):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    graph = import_graph()
    graph["edge_rnn.device.session"].add("edge_rnn.device.stepper")  # stepper imports session: now both ways
    assert ["edge_rnn.device.session", "edge_rnn.device.stepper"] in cycles(graph)


def misdirected(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if part(t) != part(m) and part(t) not in ALLOWED[part(m)])


def test_imports_run_in_the_allowed_directions():
    assert misdirected(import_graph()) == []


def test_the_direction_check_sees_a_wrong_import():
    graph = import_graph()
    graph["edge_rnn.train.data"].add("edge_rnn.exporter")  # training reaching up into a stage
    assert misdirected(graph) == ["edge_rnn.train.data imports edge_rnn.exporter"]


def test_every_part_is_placed():
    assert {part(m) for m in modules()} <= set(ALLOWED)


def test_nothing_under_device_reaches_a_stage():
    for module, targets in import_graph().items():
        if part(module) == "device":
            assert {part(t) for t in targets} <= {"device", "errors", "tolerances"}, (module, targets)
