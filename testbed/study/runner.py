"""Running a study on Ray: tune the learning rates, train every seed, audit the baselines' stages.

Three waves of one-CPU Ray tasks: (1) per arm and loss, each learning rate of the grid on each tuning
seed; (2) per arm, seed and trained policy, a full training run (the baseline's models are kept at its
stages); (3) per arm, seed and stage, the paired audits. Audits start as soon as their baseline is
trained. The tables go to a folder and, as artifacts, to one MLflow run tagged ``testbed.study``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.config.schema import ResourcesConfig
from testbed.errors import UserError
from testbed.runtime.preparation import prepare_data
from testbed.runtime.round_metrics import privacy_metrics, privacy_plan
from testbed.study.audits import Stage, audit_stage
from testbed.study.metric_noise import noise_rows
from testbed.study.page import write_rows
from testbed.study.spec import StudySpec, experiment_for
from testbed.study.training import train
from testbed.study.tuning import choose_rate
from testbed.tracking.progress import Progress
from testbed.tracking.store import Tracker
from testbed.tracking.store_check import check_tracking_uri

log = logging.getLogger(__name__)

STUDY_TAG = "testbed.study"
TABLES = ("tuning.csv", "training.csv", "audits.csv", "metric_noise.csv")


@dataclass
class StudyResult:
    """Where the study's tables are, its MLflow run and its wall time."""

    folder: Path
    run_id: str
    seconds: float


def pick_stages(accuracy: dict[int, float], wanted: Sequence[str]) -> list[Stage]:
    """The stages of a training curve: the initial model, the first evaluation at >= 50% and >= 90% of the
    final accuracy. Two stages may fall on the same round (a fast or a flat curve); both are kept."""
    rounds = sorted(accuracy)
    final = accuracy[rounds[-1]]
    thresholds = {"initial": None, "half": 0.5 * final, "ninety": 0.9 * final}
    stages: list[Stage] = []
    for name in wanted:
        threshold = thresholds[name]
        found = 0 if threshold is None else next(r for r in rounds if accuracy[r] >= threshold)
        stages.append(Stage(name, found, accuracy[found]))
    return stages


def checkout_commit(folder: Path) -> tuple[str, bool] | None:
    """The short commit of the git checkout holding ``folder`` and whether tracked files differ from it;
    None outside a checkout (or without git)."""
    import subprocess

    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None


def _described(found: tuple[str, bool] | None) -> str:
    if found is None:
        return "unknown (not a git checkout)"
    return f"`{found[0]}`" + (" (with uncommitted changes)" if found[1] else "")


def study_meta(
    spec: StudySpec, source: Path, run_id: str, seconds: float, at_start: tuple[str, bool] | None = None
) -> dict[str, Any]:
    """What the results page states about the run: command, commit (the checkout when the study started,
    ``at_start``, and the one at its end where they differ), wall time, machine, budgets."""
    import os
    import platform

    found = checkout_commit(source.resolve().parent)
    commit = _described(at_start if at_start is not None else found)
    if at_start is not None and found != at_start:
        commit += f" when the study started; {_described(found)} when it ended"
    minutes, rest = divmod(round(seconds), 60)
    budgets = "; ".join(
        f"{arm.label}: {arm.rounds} rounds, attacks {arm.portfolio_label}"
        + (f" ({json.dumps(arm.attack_params)})" if arm.attack_params else " (default budgets)")
        + (f", audited batch sizes {arm.audit_batch_sizes}" if arm.audit_batch_sizes is not None else "")
        + (f", audited policies {arm.audit_policies}" if arm.audit_policies is not None else "")
        for arm in spec.arms
    )
    return {
        "command": f"`testbed study {source}`",
        "commit": commit,
        "study_run": f"`{run_id}` in `{spec.tracking['uri']}`",
        "wall_time": f"{minutes} min {rest} s with {spec.workers} Ray workers",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "budgets": f"seeds {spec.seeds}; audits: {spec.audit.clients} clients per seed and stage, batch sizes "
        f"{spec.audit.batch_sizes}; {budgets}",
        "seconds": round(seconds, 1),
        "budget_check": "none"
        if spec.budget_check is None
        else f"arms {[spec.arms[i].label for i in spec.budget_check.arms]}, seeds {spec.budget_check.seeds}, "
        f"stages {spec.budget_check.stages}"
        + (f", policies {spec.budget_check.policies}" if spec.budget_check.policies is not None else "")
        + f": {json.dumps(spec.budget_check.attack_params)}",
    }


def _spec(payload: str) -> StudySpec:
    return StudySpec.model_validate_json(payload)


def _tune(payload: str, arm_index: int, loss: str, lr: float, seed: int) -> dict[str, Any]:
    spec = _spec(payload)
    arm = spec.arms[arm_index]
    policy = next(name for name in spec.policies if spec.loss_of(name) == loss and "dp" not in spec.policies[name])
    experiment = experiment_for(spec, arm, seed=seed, policy=policy, lr=lr)
    run = train(experiment, prepare_data(experiment), keep=False)
    return {
        "arm": arm.label,
        "loss": loss,
        "lr": lr,
        "seed": seed,
        "policy": policy,
        "final_accuracy": run.final_accuracy,
    }


def _train(payload: str, arm_index: int, seed: int, policy: str, lr: float) -> dict[str, Any]:
    spec = _spec(payload)
    arm = spec.arms[arm_index]
    experiment = experiment_for(spec, arm, seed=seed, policy=policy, lr=lr)
    data = prepare_data(experiment)
    baseline = policy == spec.baseline
    run = train(experiment, data, keep=baseline)
    privacy = privacy_metrics(privacy_plan(experiment, data.partition.sizes()), experiment.rounds)
    row: dict[str, Any] = {
        "arm": arm.label,
        "seed": seed,
        "policy": policy,
        "lr": lr,
        "final_accuracy": run.final_accuracy,
        "short_batches": run.short_batches,
        "epsilon": privacy.get("privacy/c/epsilon", ""),
        "seconds": round(run.seconds, 2),
        "curve": json.dumps({str(k): round(v, 4) for k, v in run.accuracy.items()}),
    }
    stages = pick_stages(run.accuracy, spec.audit.stages) if baseline else []
    return {"row": row, "stages": [(stage, run.snapshots[stage.round]) for stage in stages]}


def _audit(
    payload: str, arm_index: int, seed: int, stage: Stage, params: Any, lrs: dict[str, float], check: bool = False
) -> list[dict[str, Any]]:
    spec = _spec(payload)
    arm = spec.arms[arm_index]
    experiment = experiment_for(spec, arm, seed=seed, policy=spec.baseline, lr=spec.lr_for(lrs, spec.baseline))
    larger = spec.budget_check.attack_params if check and spec.budget_check is not None else None
    return audit_stage(spec, arm, seed, stage, params, lrs, prepare_data(experiment), larger)


@dataclass(frozen=True)
class _Task:
    """What a pending Ray task is: training (``what`` = policy) or an audit (``what`` = stage)."""

    kind: str
    arm: int
    seed: int
    label: str
    what: str
    aliases: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.kind} of {self.label}, seed {self.seed}, {self.what}"


def run_study(spec: StudySpec, source: Path, out: Path, *, show_progress: bool = True) -> StudyResult:
    """Run the whole study on a local Ray with ``spec.workers`` CPUs; write the tables to ``out`` and MLflow."""
    import ray

    from testbed.runtime.cluster import ray_session

    started = time.perf_counter()
    at_start = checkout_commit(source.resolve().parent)
    check_tracking_uri(str(spec.tracking["uri"]))
    first = experiment_for(spec, spec.arms[0], seed=spec.seeds[0], policy=spec.baseline, lr=spec.arms[0].lr_grid[0])
    prepare_data(first)  # a missing data set is a one-line error before Ray starts
    tracker = Tracker.for_experiment(first)
    tracker.check()
    out.mkdir(parents=True, exist_ok=True)
    payload = spec.model_dump_json()
    losses = sorted({spec.loss_of(name) for name in spec.policies if "dp" not in spec.policies[name]})
    run_id = tracker.start_run(
        spec.name,
        {"study": source.name, "seeds": str(len(spec.seeds)), "arms": str(len(spec.arms))},
        tags={STUDY_TAG: "study"},
    )
    tracker.log_text(run_id, source.read_text(encoding="utf-8"), "study.yaml")
    status = "FAILED"
    try:
        with ray_session(ResourcesConfig(num_cpus=spec.workers)):
            tune: Any = ray.remote(num_cpus=1)(_tune)
            trainer: Any = ray.remote(num_cpus=1)(_train)
            auditor: Any = ray.remote(num_cpus=1)(_audit)
            ref = ray.put(payload)
            tuning_refs = [
                tune.remote(ref, index, loss, lr, seed)
                for index, arm in enumerate(spec.arms)
                for loss in losses
                for lr in arm.lr_grid
                for seed in spec.tuning_seeds
            ]
            tuning = _gather(tuning_refs, "tuning", show_progress)
            lrs: list[dict[str, float]] = []
            for arm in spec.arms:
                chosen: dict[str, float] = {}
                for loss in losses:
                    tried = [row for row in tuning if row["arm"] == arm.label and row["loss"] == loss]
                    if not tried:
                        raise UserError(
                            f"study: every learning-rate run of {arm.label} with {loss} failed (see the log)"
                        )
                    chosen[loss] = choose_rate(tried, spec.tuning_seeds)
                lrs.append(chosen)
            for row in tuning:
                row["chosen"] = int(lrs[[a.label for a in spec.arms].index(row["arm"])][row["loss"]] == row["lr"])
            training, audits, failures = _train_and_audit(spec, ref, trainer, auditor, lrs, show_progress)
        dataset = prepare_data(first).dataset
        noise = noise_rows(
            dataset.test_x, dataset.test_y, (dataset.train_x, dataset.train_y), seed=spec.tuning_seeds[0]
        )
        for name, rows in zip(TABLES, (tuning, training, audits, noise), strict=True):
            write_rows(out / name, rows)
            tracker.log_file(run_id, out / name, "study")
        seconds = time.perf_counter() - started
        meta = study_meta(spec, source, run_id, seconds, at_start)
        meta["notes"] = (
            [f"{len(failures)} study tasks failed; their cells are missing: " + " / ".join(failures)]
            if failures
            else []
        )
        (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (out / "study.yaml").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")  # report reads it
        tracker.log_file(run_id, out / "meta.json", "study")
        status = "FINISHED"
    finally:
        tracker.end_run(run_id, status)
    return StudyResult(out, run_id, time.perf_counter() - started)


def _gather(refs: list[Any], name: str, show_progress: bool) -> list[dict[str, Any]]:
    import ray

    progress = Progress(len(refs), f"study {name}", enabled=show_progress, unit="run")
    rows: list[dict[str, Any]] = []
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                rows.append(ray.get(done[0]))
            except ray.exceptions.RayError as exc:  # a failed tuning run is left out of the learning-rate choice
                log.warning("study %s run failed: %s", name, " ".join(str(exc).split())[:300])
            progress.update(len(rows), {})
    finally:
        progress.close()
    return rows


def _train_and_audit(
    spec: StudySpec, ref: Any, trainer: Any, auditor: Any, lrs: list[dict[str, float]], show_progress: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Every training run; each baseline's stages go to the auditors as soon as it is trained."""
    import ray

    pending: dict[Any, _Task] = {}
    for index, arm in enumerate(spec.arms):
        for seed in spec.seeds:
            for policy in spec.trained_policies(arm):
                lr = spec.lr_for(lrs[index], policy)
                pending[trainer.remote(ref, index, seed, policy, lr)] = _Task("train", index, seed, arm.label, policy)
    total = len(pending) + len(spec.arms) * len(spec.seeds) * len(spec.audit.stages)
    progress = Progress(total, "study training and audits", enabled=show_progress, unit="task")
    training: list[dict[str, Any]] = []
    audits: list[dict[str, Any]] = []
    failures: list[str] = []
    finished = 0
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            finished += 1
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as exc:  # one failed task (or a lost worker) must not lose the rest
                cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
                failures.append(
                    f"{task.describe()} failed: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
                )
                progress.update(finished, {"failed": float(len(failures))})
                continue
            index, seed = task.arm, task.seed
            if task.kind == "train":
                training.append(result["row"])
                by_round: dict[int, list[tuple[Stage, Any]]] = {}
                for stage, params in result["stages"]:
                    by_round.setdefault(stage.round, []).append((stage, params))
                total -= len(spec.audit.stages) - len(by_round) if result["stages"] else 0
                label = spec.arms[index].label
                for same in by_round.values():
                    stage, params = same[0]
                    aliases = tuple(other.name for other, _ in same[1:])
                    reference = auditor.remote(ref, index, seed, stage, params, lrs[index])
                    pending[reference] = _Task("audit", index, seed, label, stage.name, aliases)
                    check = spec.budget_check
                    if check is None or index not in check.arms or seed not in check.seeds:
                        continue
                    for other, _ in same:
                        if other.name in check.stages:
                            extra = auditor.remote(ref, index, seed, other, params, lrs[index], True)
                            pending[extra] = _Task("budget check", index, seed, label, other.name)
                            total += 1
                progress.resize(total)
            else:
                audits.extend(result)
                # a stage on the same round as an earlier one is the same model: its audits are those rows
                for alias in task.aliases:
                    audits.extend({**row, "stage": alias} for row in result)
            progress.update(finished, {"audited": float(len(audits))})
    finally:
        progress.close()
    return training, audits, failures
