"""Running a parameter sweep: each combination of the plan (testbed.config.sweep_plan) a child MLflow
run under one parent run, all on one Ray cluster; a resumed sweep skips combinations already finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from testbed.config.schema import Experiment
from testbed.config.sweep_plan import MAX_SWEEP_CELLS, Combination, plan
from testbed.errors import UserError
from testbed.tracking.progress import Progress
from testbed.tracking.store import Tracker, flatten
from testbed.tracking.store_check import check_output_folders, check_tracking_uri

PARENT_TAG = "testbed.sweep"
COMBINATION_TAG = "testbed.combination"


@dataclass
class SweepResult:
    """The parent run and the child run of every combination (None where it was skipped)."""

    parent_run_id: str
    runs: list[tuple[Combination, str]] = field(default_factory=list)
    skipped: int = 0


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
    experiment: Experiment,
    *,
    show_progress: bool = True,
    resume_parent_id: str | None = None,
    max_cells: int = MAX_SWEEP_CELLS,
) -> SweepResult:
    """Run every combination as a child of one parent run, on one Ray cluster."""
    from testbed.engine import run_experiment
    from testbed.runtime.cluster import check_address, ray_session
    from testbed.runtime.preparation import prepare_data

    cells = plan(experiment, max_cells)
    check_tracking_uri(experiment.tracking.uri)
    check_output_folders(experiment.tracking.checkpoints, experiment.tracking.artifact_location)
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
        with ray_session(experiment.resources, experiment):
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
