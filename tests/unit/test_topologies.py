"""Every shipped topology file is valid against the schema (sweeps: every cell); study files are checked in
tests/integration/test_study.py."""

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
