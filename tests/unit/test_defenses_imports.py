"""The defences package stays usable on its own: no engine, attack, Ray or MLflow imports."""

from __future__ import annotations

import ast
from pathlib import Path

import defenses

FORBIDDEN = ("testbed", "attacks", "ray", "mlflow")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a source file imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_defenses_imports_no_engine_attack_ray_or_mlflow() -> None:
    sources = sorted(Path(defenses.__file__).parent.glob("*.py"))
    assert len(sources) >= 8
    for source in sources:
        assert not imported_modules(source) & set(FORBIDDEN), source.name
