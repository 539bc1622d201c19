"""Loading a topology file: read it, apply ``--set`` overrides, validate it and every cell of its sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.config.schema import Experiment
from testbed.config.sweep_plan import MAX_SWEEP_CELLS, plan
from testbed.config.topology import apply_overrides, read_yaml, validate
from testbed.data.import_path import find_folder, is_import_path


def load_experiment(
    path: str | Path, overrides: Sequence[str] = (), max_sweep_cells: int = MAX_SWEEP_CELLS
) -> Experiment:
    """Read, override and validate a topology file; a sweep's combinations (at most ``max_sweep_cells``) too."""
    data, node = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    experiment = validate(data, source=str(path), node=node)
    record_code_folders(experiment, Path(path).resolve().parent)
    if experiment.sweep is not None:
        plan(experiment, max_sweep_cells)
    return experiment


def record_code_folders(experiment: Experiment, folder: Path) -> None:
    """Record where an import-path model or data set is imported from, so every Ray worker finds it.

    A given ``path`` is made absolute (relative to ``folder``, the topology file's); otherwise the first
    of ``folder`` and the working directory that holds the module is recorded. A module found in neither
    keeps ``path`` null and is imported from PYTHONPATH (or reported missing before the run starts).
    """
    for block in (experiment.model, experiment.dataset):
        if not is_import_path(block.name):
            continue
        if block.path is not None:
            block.path = str((folder / Path(block.path).expanduser()).resolve())
        else:
            block.path = find_folder(block.name, [folder, Path.cwd()])
