"""The house's rules, checked on its source: no import cycle (function-level imports included), modules under 450
lines, and every run setting declared once, as one option of each command that takes it, with one default."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from adapters.runspec import RunSpec, fields_for

PACKAGE = Path(__file__).resolve().parent.parent / "adapters"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports anywhere in its source (in functions, under
    TYPE_CHECKING), as `from .x import y` resolves: to the submodule y when there is one, else to x."""
    modules = _modules()

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                found = target(name) if name.split(".")[0] == "adapters" else None
                # A module's own package (its __init__) and the package root's lazy re-exports are not edges.
                if found and found != module and found != "adapters" and not module.startswith(found + "."):
                    graph[module].add(found)
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = import_graph()
    assert graph["adapters.training.loop"] >= {"adapters.resuming", "adapters.training.session"}  # the walk sees
    assert "adapters.resolver" in graph["adapters.resuming"]  # function-level imports too
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_closed_inside_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_stays_under_450_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines; split it by what its parts do"


@pytest.mark.parametrize("command", ["train", "bench", "plan"])
def test_every_run_setting_is_one_option_of_each_command_that_takes_it(command):
    """Generated from RunSpec's declarations: one option a field, its default RunSpec's, for all three commands."""
    from adapters.cli import cli

    options = {p.name: p for p in cli.commands[command].params}
    taken = fields_for(command)
    assert taken, command
    for field in taken:
        matching = [p for p in cli.commands[command].params if p.name == field.name]
        assert len(matching) == 1, (command, field.name)
        default = None if field.default is dataclasses.MISSING else field.default
        if field.name not in ("resume", "options", "report_to"):
            assert options[field.name].default == default, (command, field.name)
    assert {f.name for f in fields_for("train")} == {f.name for f in dataclasses.fields(RunSpec)}
    assert {f.name for f in fields_for("plan")} <= {f.name for f in fields_for("bench")}


def test_the_workload_has_one_set_of_defaults():
    from adapters.bench.settings import BenchSettings
    from adapters.plan import PlanSettings

    assert BenchSettings().spec == PlanSettings().spec == RunSpec()
    assert (RunSpec.batch_size, RunSpec.seq_len) == (4, 128)
