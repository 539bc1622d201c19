"""Sweep plans: a grid (or a list) of overrides, each combination validated before anything runs.

The ``sweep`` block maps dotted field paths to lists of values and takes their product. Several
fields that must change together share one key, comma-separated, with one list of values per
combination: ``"model.name,attack.name": [[softmax, ce-demix], [lenet, inverting-gradients]]``.
A list of mappings instead gives the combinations explicitly. testbed.sweep runs the plan.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from testbed.config.schema import MAX_SWEEP_CELLS as MAX_SWEEP_CELLS  # re-exported for the CLI
from testbed.config.schema import Experiment
from testbed.config.topology import set_path, validate
from testbed.errors import UserError


@dataclass(frozen=True)
class Combination:
    """One cell of a sweep: the field paths it sets and their values."""

    values: dict[str, Any]

    @property
    def key(self) -> str:
        """A canonical text of the values, stored as a tag to recognise the cell when resuming."""
        return json.dumps(self.values, sort_keys=True)

    @property
    def label(self) -> str:
        """A short human-readable name for the child run."""
        return ", ".join(f"{path}={json.dumps(value)}" for path, value in self.values.items())


def _check_cells(count: int, max_cells: int) -> None:
    if count > max_cells:
        raise UserError(
            f"sweep: {count:,} combinations, more than the {max_cells:,} allowed; split the sweep, or raise the "
            "limit with --max-sweep-cells N"
        )


def expand(
    sweep: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], max_cells: int = MAX_SWEEP_CELLS
) -> list[Combination]:
    """All combinations of a sweep block, in a fixed order (the first key varies slowest).

    More than ``max_cells`` combinations is a UserError, raised before any of them is built.
    """
    if isinstance(sweep, Sequence) and not isinstance(sweep, str):
        _check_cells(len(sweep), max_cells)
        return [Combination(dict(cell)) for cell in sweep]
    count = 1
    for values in sweep.values():
        count *= len(values) if isinstance(values, list) else 1
    _check_cells(count, max_cells)
    axes: list[list[dict[str, Any]]] = []
    for key, values in sweep.items():
        paths = [part.strip() for part in key.split(",")]
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.{key}: expected a non-empty list of values")
        axis = []
        for value in values:
            if len(paths) == 1:
                axis.append({paths[0]: value})
            elif isinstance(value, list) and len(value) == len(paths):
                axis.append(dict(zip(paths, value, strict=True)))
            else:
                raise UserError(f"sweep.{key}: each value must be a list of {len(paths)} values, got {value!r}")
        axes.append(axis)
    return [Combination({k: v for part in cell for k, v in part.items()}) for cell in itertools.product(*axes)]


def plan(experiment: Experiment, max_cells: int = MAX_SWEEP_CELLS) -> list[tuple[Combination, Experiment]]:
    """Every combination with its validated experiment; the first invalid one (or too many) raises a UserError."""
    if experiment.sweep is None:
        return []
    base = experiment.model_dump(mode="json", exclude={"sweep"})
    cells = []
    for combination in expand(experiment.sweep, max_cells):
        data = json.loads(json.dumps(base))
        for path, value in combination.values.items():
            set_path(data, path, value, origin=f"sweep {combination.label}:")
        cells.append((combination, validate(data, source=f"sweep [{combination.label}]")))
    return cells
