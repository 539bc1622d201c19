"""Every shipped topology file is valid against the schema (sweeps: every cell)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.config.load import load_experiment
from testbed.config.sweep_plan import plan
from tests.conftest import REPO

FILES = [*sorted((REPO / "topologies").glob("*.yaml")), REPO / "benchmarks" / "workload.yaml"]


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_topology_is_valid(path: Path) -> None:
    experiment = load_experiment(path)
    assert experiment.rounds >= 1
    if experiment.sweep is not None:
        assert len(plan(experiment)) > 1


def test_the_study_covers_the_grid() -> None:
    cells = plan(load_experiment(REPO / "topologies" / "mixing-study.yaml"))
    assert len(cells) == 4 * 10 * 5
    assert {cell.clients[0].batch_size for _, cell in cells} == {1, 2, 4, 8, 16}
    assert {(cell.model.name, cell.attack.name) for _, cell in cells if cell.attack} == {
        ("softmax", "ce-demix"),
        ("mlp", "dense-ratio"),
        ("lenet", "inverting-gradients"),
    }
