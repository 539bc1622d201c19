"""Parameter sweeps: a grid (or a list) of overrides, each combination a child MLflow run.

The ``sweep`` block maps dotted field paths to lists of values and takes their product. Several
fields that must change together share one key, comma-separated, with one list of values per
combination: ``"model.name,attack.name": [[softmax, ce-demix], [lenet, inverting-gradients]]``.
A list of mappings instead gives the combinations explicitly. Every combination is validated before
anything runs; all runs share one Ray cluster; a resumed sweep skips combinations already finished.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.config import Experiment
from testbed.errors import UserError
from testbed.progress import Progress
from testbed.store_check import check_tracking_uri
from testbed.topology import set_path, validate
from testbed.tracking import Tracker, flatten

PARENT_TAG = "testbed.sweep"
COMBINATION_TAG = "testbed.combination"


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


@dataclass
class SweepResult:
    """The parent run and the child run of every combination (None where it was skipped)."""

    parent_run_id: str
    runs: list[tuple[Combination, str]] = field(default_factory=list)
    skipped: int = 0


def expand(sweep: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[Combination]:
    """All combinations of a sweep block, in a fixed order (the first key varies slowest)."""
    if isinstance(sweep, Sequence) and not isinstance(sweep, str):
        return [Combination(dict(cell)) for cell in sweep]
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


def plan(experiment: Experiment) -> list[tuple[Combination, Experiment]]:
    """Every combination with its validated experiment; the first invalid one raises a UserError."""
    if experiment.sweep is None:
        return []
    base = experiment.model_dump(mode="json", exclude={"sweep"})
    cells = []
    for combination in expand(experiment.sweep):
        data = json.loads(json.dumps(base))
        for path, value in combination.values.items():
            set_path(data, path, value, origin=f"sweep {combination.label}:")
        cells.append((combination, validate(data, source=f"sweep [{combination.label}]")))
    return cells


def _finished(tracker: Tracker, parent_run_id: str) -> set[str]:
    """Combination keys of the parent's children that completed."""
    experiment_id = tracker.ensure_experiment()
    children = tracker.client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
    )
    return {
        run.data.tags[COMBINATION_TAG]
        for run in children
        if run.info.status == "FINISHED" and COMBINATION_TAG in run.data.tags
    }


def run_sweep(
    experiment: Experiment, *, show_progress: bool = True, resume_parent_id: str | None = None
) -> SweepResult:
    """Run every combination as a child of one parent run, on one Ray cluster."""
    from testbed.cluster import check_address, ray_session
    from testbed.engine import prepare_data, run_experiment

    cells = plan(experiment)
    check_tracking_uri(experiment.tracking.uri)
    for _, cell in cells:
        prepare_data(cell)
    check_address(experiment.resources)
    tracker = Tracker.for_experiment(experiment)
    tracker.check()
    done: set[str] = set()
    if resume_parent_id is None:
        params = flatten(experiment.model_dump(mode="json", exclude={"sweep"}))
        params["sweep"] = json.dumps(experiment.sweep)[:6000]
        parent = tracker.start_run(experiment.name, params, tags={PARENT_TAG: "parent"})
    else:
        try:
            tracker.client.get_run(resume_parent_id)
        except Exception:
            raise UserError(f"--resume: no MLflow run {resume_parent_id!r} in {tracker.uri}") from None
        parent = resume_parent_id
        done = _finished(tracker, parent)
    result = SweepResult(parent)
    progress = Progress(len(cells), f"{experiment.name} sweep", enabled=show_progress, unit="combination")
    status = "FAILED"
    try:
        with ray_session(experiment.resources):
            for index, (combination, cell) in enumerate(cells, start=1):
                if combination.key in done:
                    result.skipped += 1
                    progress.update(index, {"skipped": 1})
                    continue
                run = run_experiment(
                    cell,
                    show_progress=False,
                    parent_run_id=parent,
                    run_name=combination.label,
                    tags={COMBINATION_TAG: combination.key},
                )
                result.runs.append((combination, run.run_id))
                progress.update(index, {"acc": run.final_accuracy})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        progress.close()
        tracker.end_run(parent, status)
    return result
