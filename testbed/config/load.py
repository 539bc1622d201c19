"""Loading a topology file: read it, apply ``--set`` overrides, validate it and every cell of its sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.config.schema import Experiment
from testbed.config.sweep_plan import plan
from testbed.config.topology import apply_overrides, read_yaml, validate


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Read, override and validate a topology file; a sweep's combinations are validated too."""
    data, node = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    experiment = validate(data, source=str(path), node=node)
    if experiment.sweep is not None:
        plan(experiment)
    return experiment
