"""testbed/ is laid out by the stages of a round, and its modules import downwards only.

Every import is counted, including those inside functions: a lazy import that closes a loop is still
a loop. The stages, lowest first: errors; data; config; runtime; audit and tracking; report; and on
top the engine, sweeps and the CLI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "testbed"
LEVELS = {
    "testbed.errors": 0,
    "testbed.data": 1,
    "testbed.config": 2,
    "testbed.runtime": 3,
    "testbed.tracking": 4,
    "testbed.audit": 4,
    "testbed.report": 5,
    "testbed.engine": 6,
    "testbed.study": 6,
    "testbed.integrations": 6,
    "testbed.sweep": 7,
    "testbed.cli": 8,
    "testbed.__main__": 9,
}
ENGINE_FREE = ("attacks", "defenses", "metrics")  # usable from a notebook: never the engine, Ray or MLflow


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def _level(module: str) -> int:
    for prefix, level in LEVELS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module}: not in any stage of the layout; add it to LEVELS")


def test_every_module_sits_in_a_stage_folder() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "engine.py", "errors.py", "sweep.py"]
    for module in _graph():
        if module != "testbed":
            _level(module)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every loop a depth-first walk of ``graph`` meets, as the modules along it."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_there_is_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_stages_import_downwards_only() -> None:
    upward = [
        f"{module} -> {dep}"
        for module, deps in _graph().items()
        if module != "testbed"
        for dep in deps
        if dep != "testbed" and _level(dep) > _level(module)
    ]
    assert upward == []


def test_attacks_defences_and_metrics_never_import_the_engine() -> None:
    offending = [
        f"{path.relative_to(REPO)} imports {dep}"
        for package in ENGINE_FREE
        for path in (REPO / package).rglob("*.py")
        for dep in _imports(path)
        if dep.split(".")[0] in ("testbed", "ray", "mlflow")
    ]
    assert offending == []


def test_only_the_flower_wrapper_and_mod_import_flower() -> None:
    """Flower is an optional extra: the auditor core and everything else import without it."""
    allowed = {"testbed.integrations.flower.strategy", "testbed.integrations.flower.mod"}
    offending = [
        name
        for path in PACKAGE.rglob("*.py")
        for name in [_module_name(path)]
        if name not in allowed and any(dep.split(".")[0] == "flwr" for dep in _imports(path))
    ]
    assert offending == []


def test_the_import_path_resolver_needs_only_the_standard_library() -> None:
    """defenses/import_path.py finds the user's code for defence parts and for the engine (models, data sets):
    both packages import it, so it imports nothing of theirs, nor anything installed."""
    path = REPO / "defenses" / "import_path.py"
    outside = sorted(dep for dep in _imports(path) if dep.split(".")[0] not in sys.stdlib_module_names)
    assert outside == []
