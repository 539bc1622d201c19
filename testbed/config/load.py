"""Loading a topology file: read it, apply ``--set`` overrides, validate it and every cell of its sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from defenses.import_path import is_import_path, recorded_folder
from testbed.config.schema import Experiment
from testbed.config.sweep_plan import MAX_SWEEP_CELLS, plan
from testbed.config.topology import apply_overrides, read_yaml, validate


def load_experiment(
    path: str | Path, overrides: Sequence[str] = (), max_sweep_cells: int = MAX_SWEEP_CELLS
) -> Experiment:
    """Read, override and validate a topology file; a sweep's combinations (at most ``max_sweep_cells``) too."""
    data, node = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    folder = Path(path).resolve().parent
    experiment = validate(data, source=str(path), node=node, folder=str(folder))
    record_code_folders(experiment, folder)
    if experiment.sweep is not None:
        plan(experiment, max_sweep_cells)
    return experiment


def record_code_folders(experiment: Experiment, folder: Path) -> None:
    """Record where an import-path model or data set is imported from, so every Ray worker finds it.

    A given ``path`` is made absolute (relative to ``folder``, the topology file's); otherwise the first
    of ``folder`` and the working directory that holds the module is recorded. A module found in neither
    keeps ``path`` null and is imported from PYTHONPATH (or reported missing before the run starts).
    A client group's ``defence.path`` follows the same rule (``defenses.import_path.recorded_folder``),
    recorded while the group is validated, since its parts are built then.
    """
    for block in (experiment.model, experiment.dataset):
        if is_import_path(block.name):
            block.path = recorded_folder([block.name], block.path, folder)
