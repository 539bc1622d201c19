"""The round loop: sample, simulate on the worker pool, aggregate, evaluate, log, checkpoint.

``run_experiment`` is the one entry point the CLI, sweeps and tests use. Input problems are raised as
``UserError`` before Ray starts or any MLflow run is created, so a mistake leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from testbed.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from testbed.config import AuditConfig, Experiment
from testbed.datasets import Dataset, DatasetUnavailable, load_dataset
from testbed.errors import UserError
from testbed.local_update import evaluate
from testbed.models import model_for
from testbed.partition import Partition, PartitionError, partition
from testbed.progress import Progress
from testbed.records import ChunkSummary, Params
from testbed.scheduling import audited_clients, group_bounds, make_tasks, sample_clients
from testbed.store_check import check_tracking_uri
from testbed.tracking import Tracker, TrackingUnavailable, flatten

log = logging.getLogger(__name__)


class RunAborted(RuntimeError):
    """The run stopped on purpose (too few updates in a round); the message says why."""


@dataclass
class PreparedData:
    """The data set and its partition among all clients."""

    dataset: Dataset
    partition: Partition


@dataclass
class RunResult:
    """What a finished run leaves: its MLflow id, final parameters and per-round metrics."""

    run_id: str
    params: Params
    history: list[dict[str, float]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    leakage: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last evaluated round."""
        scores = [row["test_accuracy"] for row in self.history if "test_accuracy" in row]
        return scores[-1] if scores else float("nan")


def prepare_data(experiment: Experiment) -> PreparedData:
    """Load the data set and partition it; every problem becomes a one-line UserError."""
    spec = experiment.dataset
    try:
        dataset = load_dataset(
            spec.name,
            root=spec.root,
            download=spec.download,
            test_fraction=spec.test_fraction,
            seed=experiment.seed,
            max_train=spec.max_train,
            max_test=spec.max_test,
            synthetic_samples=spec.synthetic_samples,
            synthetic_shape=(spec.synthetic_shape[0], spec.synthetic_shape[1], spec.synthetic_shape[2]),
        )
    except DatasetUnavailable as exc:
        raise UserError(f"dataset.name: {exc}") from None
    try:
        split = partition(
            dataset.train_y,
            experiment.total_clients,
            spec.partition.scheme,
            seed=experiment.seed,
            alpha=spec.partition.alpha,
            shards_per_client=spec.partition.shards_per_client,
            min_samples=spec.partition.min_samples,
        )
    except PartitionError as exc:
        raise UserError(f"dataset.{exc}" if str(exc).startswith("partition") else f"dataset.partition: {exc}") from None
    sizes = split.sizes()
    bounds = group_bounds(experiment)
    for g, group in enumerate(experiment.clients):
        median = float(np.median(sizes[bounds[g] : bounds[g + 1]]))
        if group.batch_size > median:
            raise UserError(
                f"clients[{g}].batch_size: {group.batch_size} exceeds the median shard of group "
                f"{group.group!r} ({median:g} samples per client); use a smaller batch or fewer clients"
            )
    return PreparedData(dataset, split)


def initial_params(experiment: Experiment, dataset: Dataset) -> Params:
    """The global model's initial parameters, a function of the seed only."""
    model = model_for(experiment.model, dataset.input_shape, dataset.num_classes, seed=experiment.seed)
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def resolved_yaml(experiment: Experiment) -> str:
    """The experiment with every default filled in, as YAML."""
    return yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)


def _round_metrics(summaries: list[ChunkSummary], experiment: Experiment) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for group in experiment.clients:
        mine = [s for s in summaries if s.group == group.group]
        prefix = f"clients/{group.group}/"
        metrics[prefix + "sampled"] = sum(s.sampled for s in mine)
        metrics[prefix + "accepted"] = sum(s.accepted for s in mine)
        metrics[prefix + "dropped"] = sum(s.dropped for s in mine)
        metrics[prefix + "late"] = sum(s.late for s in mine)
        metrics[prefix + "short_batches"] = sum(s.short_batches for s in mine)
        for reason in mine[0].rejected if mine else ():
            metrics[prefix + f"rejected_{reason}"] = sum(s.rejected[reason] for s in mine)
    for key in ("sampled", "accepted", "dropped", "late"):
        metrics[key] = sum(getattr(s, key) for s in summaries)
    metrics["rejected"] = sum(sum(s.rejected.values()) for s in summaries)
    metrics["simulated_delay_s"] = max((s.max_delay_s for s in summaries), default=0.0)
    return metrics


def run_experiment(
    experiment: Experiment,
    *,
    show_progress: bool = True,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunResult:
    """Run every round of an experiment on Ray and track it in MLflow; return the final state."""
    import ray

    from testbed.audit import AttackWorker
    from testbed.cluster import check_address, check_resources, ray_session
    from testbed.leakage import GRID_MAX_CLIENTS, LeakageMeter
    from testbed.scoring import LeakageScorer
    from testbed.tree import build_tree
    from testbed.workers import WorkerPool

    check_tracking_uri(experiment.tracking.uri)
    data = prepare_data(experiment)
    state: dict[str, Any] = {}
    if resume_run_id is not None:
        state = load_checkpoint(checkpoint_path(experiment.tracking.checkpoints, resume_run_id))
        _check_same_experiment(experiment, state)
    check_address(experiment.resources)
    tracker = Tracker.for_experiment(experiment)
    tracker.check()
    start_round = 0
    history: list[dict[str, float]] = []
    params = initial_params(experiment, data.dataset)
    if state:
        start_round, params, history = int(state["round"]), state["params"], list(state["history"])
        tracker.pending = [(str(r), int(s), dict(m)) for r, s, m in state.get("pending_metrics", [])]
    with ray_session(experiment.resources) as available:
        size = check_resources(experiment.resources, available, auditing=experiment.attack is not None)
        dataset = data.dataset
        data_ref = ray.put({"x": dataset.train_x, "y": dataset.train_y})
        partition_ref = ray.put(data.partition)
        pool = WorkerPool(experiment, data_ref, partition_ref, dataset.num_classes, size)
        worker_nodes = pool.nodes()
        attack_workers: list[str] = []
        attack_actors: list[Any] = []
        scorer: Any = None
        if experiment.attack is not None:
            attack_resources = experiment.resources.attack
            attack_class = ray.remote(num_cpus=attack_resources.num_cpus, num_gpus=attack_resources.num_gpus)(
                AttackWorker
            )
            token = uuid.uuid4().hex[:12]
            attack_workers = [f"testbed-attack-{token}-{index}" for index in range(attack_resources.workers)]
            attack_actors = [
                attack_class.options(name=name).remote(experiment, dataset.input_shape, dataset.num_classes)
                for name in attack_workers
            ]
            scorer = ray.remote(num_cpus=0)(LeakageScorer).remote(data_ref, attack_resources.nice, GRID_MAX_CLIENTS)
            attack_actors.append(scorer)
            ray.get([actor.__ray_ready__.remote() for actor in attack_actors])
        tree = build_tree(experiment, attack_workers)
        eval_model = model_for(experiment.model, dataset.input_shape, dataset.num_classes)
        test_x, test_y = torch.as_tensor(dataset.test_x), torch.as_tensor(dataset.test_y)
        if resume_run_id is None:
            run_id = tracker.start_run(
                run_name or experiment.name,
                flatten(experiment.model_dump(mode="json")),
                parent_run_id=parent_run_id,
                tags=tags,
            )
            tracker.log_text(run_id, resolved_yaml(experiment), "config.yaml")
        else:
            run_id = resume_run_id
        meter = LeakageMeter(dataset, tracker, run_id, scorer)
        meter.restore(state.get("audits", {}))
        progress = Progress(experiment.rounds, experiment.name, enabled=show_progress)
        progress.start_at(start_round)
        status = "FAILED"
        leakage: dict[str, dict[str, float]] = {}
        try:
            for round_index in range(start_round, experiment.rounds):
                started = time.perf_counter()
                sampled = sample_clients(experiment, round_index)
                audited = audited_clients(experiment, round_index, sampled)
                audit_wait, skipped = 0.0, 0
                if len(audited) and experiment.attack is not None:
                    audit_wait, skipped = _make_room(meter, experiment.attack.audit, len(audited))
                    audited = audited[:0] if skipped else audited
                tasks = make_tasks(experiment, round_index, sampled, audited)
                params_ref = ray.put(params)
                summaries, payload_refs, audited_refs = pool.run_round(params_ref, tasks)
                new_params, audit_refs = tree.aggregate(params_ref, summaries, payload_refs, audited_refs)
                meter.expect(round_index, tree.ground_truth(summaries), audit_refs)
                metrics = _round_metrics(summaries, experiment)
                if metrics["accepted"] < experiment.sampling.min_clients:
                    raise RunAborted(
                        f"round {round_index + 1}: only {int(metrics['accepted'])} updates accepted, fewer than "
                        f"sampling.min_clients={experiment.sampling.min_clients}; the run stops here"
                    )
                params = new_params
                seconds = time.perf_counter() - started
                metrics["round_seconds"] = seconds
                metrics["clients_per_second"] = len(sampled) / seconds if seconds > 0 else 0.0
                metrics["workers_replaced"] = pool.replaced
                if experiment.attack is not None:
                    metrics["audit/wait_seconds"] = audit_wait
                    metrics["audit/skipped_clients"] = float(skipped)
                last = round_index + 1 == experiment.rounds
                if (round_index + 1) % experiment.evaluation.every == 0 or last:
                    eval_started = time.perf_counter()
                    loss, accuracy = evaluate(eval_model, params, test_x, test_y, experiment.evaluation.batch_size)
                    metrics.update(test_loss=loss, test_accuracy=accuracy)
                    metrics["eval_seconds"] = time.perf_counter() - eval_started
                tracker.queue(run_id, metrics, step=round_index + 1)
                meter.collect(wait=False)
                history.append({"round": round_index + 1, **metrics})
                save_checkpoint(
                    checkpoint_path(experiment.tracking.checkpoints, run_id),
                    {
                        "round": round_index + 1,
                        "params": params,
                        "history": history,
                        "config": experiment.model_dump(mode="json"),
                        "pending_metrics": list(tracker.pending),
                        "audits": meter.state(),
                    },
                )
                try:
                    tracker.flush()
                except TrackingUnavailable as exc:
                    status = "UNREACHABLE"
                    raise RunAborted(f"{exc}; resume with: testbed run --resume {run_id}") from None
                shown = {"acc": metrics["test_accuracy"]} if "test_accuracy" in metrics else {}
                leaked = {f"rec[{group}]": value for group, value in meter.take_fresh().items()}
                progress.update(round_index + 1, {**shown, **leaked, "s/round": seconds})
            try:
                meter.finish()
                tracker.flush()
                leakage = meter.summary_by_group()
                _log_final(tracker, run_id, experiment, params, history)
                tracker.set_note(run_id, run_note(experiment, history, leakage, meter.grids))
            except TrackingUnavailable as exc:
                status = "UNREACHABLE"
                raise RunAborted(f"{exc}; resume with: testbed run --resume {run_id}") from None
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            progress.close()
            pool.shutdown()
            tree.shutdown()
            for actor in attack_actors:
                ray.kill(actor)
            if status != "UNREACHABLE":
                tracker.end_run(run_id, status)
    return RunResult(run_id, params, history, worker_nodes, leakage)


def _make_room(meter: Any, audit: AuditConfig, clients: int) -> tuple[float, int]:
    """Keep the audit backlog bounded before an audited round: (seconds waited, clients not audited)."""
    if meter.busy_rounds() < audit.backlog:
        return 0.0, 0
    if audit.when_busy == "skip":
        return 0.0, clients
    started = time.perf_counter()
    meter.wait_below(audit.backlog)
    return time.perf_counter() - started, 0


def _check_same_experiment(experiment: Experiment, state: Mapping[str, Any]) -> None:
    """A resumed run must use the configuration that wrote its checkpoint (only ``rounds`` may grow)."""
    saved = flatten(dict(state.get("config", {})))
    current = flatten(experiment.model_dump(mode="json"))
    saved.pop("rounds", None)
    current.pop("rounds", None)
    if saved and saved != current:
        changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        raise UserError(
            f"--resume: the checkpoint was written with a different configuration (differs in: {', '.join(changed)})"
        )


def run_note(
    experiment: Experiment,
    history: list[dict[str, float]],
    leakage: Mapping[str, Mapping[str, float]],
    grids: list[str],
) -> str:
    """The run's MLflow description (markdown): final accuracy, leakage per group, where the audit grids are."""
    accuracy = next((row["test_accuracy"] for row in reversed(history) if "test_accuracy" in row), float("nan"))
    lines = [f"**{experiment.name}**: {experiment.rounds} rounds, final test accuracy {accuracy:.4f}."]
    if experiment.attack is None:
        lines.append("")
        lines.append("No attack audited this run.")
        return "\n".join(lines)
    lines += ["", f"Leakage under `{experiment.attack.name}` (every audited sample of the run):", ""]
    lines += ["| group | audited samples | recovered | mean SSIM | mean AVD |", "| --- | --- | --- | --- | --- |"]
    for group, row in leakage.items():
        lines.append(
            f"| {group} | {int(row['audited_samples'])} | {row['recovered_fraction']:.3f} | "
            f"{row['ssim_mean']:.3f} | {row['avd_mean']:.3f} |"
        )
    if not leakage:
        lines.append("| (no audited sample was scored) | 0 | | | |")
    lines.append("")
    if grids:
        span = f"`{grids[0]}` ... `{grids[-1]}` ({len(grids)} rounds)" if len(grids) > 1 else f"`{grids[0]}`"
        lines.append(f"Audit grids (originals above matched reconstructions): {span}.")
    lines.append("Every audited sample: `audits/samples.csv`.")
    return "\n".join(lines)


def _log_final(
    tracker: Tracker, run_id: str, experiment: Experiment, params: Params, history: list[dict[str, float]]
) -> None:
    """Artifacts of a finished run: the final model and a summary."""
    with tracker.staging() as folder:
        model_file = Path(folder) / "model_state_dict.pt"
        torch.save(params, model_file)
        tracker.log_file(run_id, model_file)
    final = {key: value for key, value in history[-1].items()} if history else {}
    summary: dict[str, Any] = {
        "name": experiment.name,
        "rounds": experiment.rounds,
        "final": final,
        "best_test_accuracy": max((row.get("test_accuracy", float("nan")) for row in history), default=float("nan")),
        "total_seconds": sum(row.get("round_seconds", 0.0) for row in history),
    }
    tracker.log_json(run_id, summary, "summary.json")
