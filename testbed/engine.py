"""The round loop: prepare; per round sample, simulate, aggregate, audit, evaluate, log, checkpoint; finish.

``run_experiment`` is the one entry point the CLI, sweeps and tests use. Input problems are raised as
``UserError`` before Ray starts or any MLflow run is created, so a mistake leaves nothing behind.
``RoundLoop`` holds what lives for the length of a run (worker pool, aggregation tree, audit actors,
MLflow run) and reads as the steps of a round.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from testbed.config.schema import Experiment
from testbed.errors import RunAborted
from testbed.runtime.local_update import evaluate
from testbed.runtime.models import model_for
from testbed.runtime.preparation import PreparedData, initial_params, prepare_data
from testbed.runtime.records import ChunkSummary, Params
from testbed.runtime.round_metrics import privacy_metrics, privacy_plan, round_metrics
from testbed.runtime.round_step import check_accepted
from testbed.runtime.scheduling import audited_clients, make_tasks, sample_clients
from testbed.tracking.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from testbed.tracking.progress import Progress
from testbed.tracking.run_summary import check_same_experiment, log_final, resolved_yaml, run_note
from testbed.tracking.store import Tracker, TrackingUnavailable, flatten
from testbed.tracking.store_check import check_output_folders, check_tracking_uri

if TYPE_CHECKING:
    from testbed.audit.precision import PrecisionTarget

log = logging.getLogger(__name__)

__all__ = ["RoundLoop", "RunAborted", "RunResult", "initial_params", "prepare_data", "run_experiment"]


@dataclass
class RunResult:
    """What a finished run leaves: its MLflow id, final parameters and per-round metrics."""

    run_id: str
    params: Params
    history: list[dict[str, float]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    leakage: dict[str, dict[str, float]] = field(default_factory=dict)
    loop_seconds: float = 0.0  # from the first round's start to the last records: rounds, logging, final wait

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last evaluated round."""
        scores = [row["test_accuracy"] for row in self.history if "test_accuracy" in row]
        return scores[-1] if scores else float("nan")


@dataclass
class Prepared:
    """Everything settled before Ray starts: checked inputs, data, the tracker and where the run resumes."""

    data: PreparedData
    tracker: Tracker
    start_round: int
    params: Params
    history: list[dict[str, float]]
    state: dict[str, Any]


def prepare(experiment: Experiment, resume_run_id: str | None) -> Prepared:
    """Check the store address, load the data, read a checkpoint, reach the cluster and the store."""
    from testbed.runtime.cluster import check_address

    check_tracking_uri(experiment.tracking.uri)
    check_output_folders(experiment.tracking.checkpoints, experiment.tracking.artifact_location)
    data = prepare_data(experiment)
    state: dict[str, Any] = {}
    if resume_run_id is not None:
        state = load_checkpoint(checkpoint_path(experiment.tracking.checkpoints, resume_run_id))
        check_same_experiment(experiment, state)
    check_address(experiment.resources)
    tracker = Tracker.for_experiment(experiment)
    tracker.check()
    if state:
        tracker.pending = [(str(r), int(s), dict(m)) for r, s, m in state.get("pending_metrics", [])]
        return Prepared(data, tracker, int(state["round"]), state["params"], list(state["history"]), state)
    return Prepared(data, tracker, 0, initial_params(experiment, data.dataset), [], state)


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
    from testbed.runtime.cluster import ray_session

    prepared = prepare(experiment, resume_run_id)
    with ray_session(experiment.resources, experiment) as available:
        loop = RoundLoop(experiment, prepared, available, show_progress=show_progress)
        try:
            loop.open_run(resume_run_id, parent_run_id, run_name or experiment.name, tags)
        except BaseException as exc:  # the run may be open already: it ends FAILED (KILLED), never RUNNING
            loop.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        return loop.execute()


class RoundLoop:
    """One run on a Ray session: the actors it needs, then its rounds, then its final records."""

    def __init__(
        self, experiment: Experiment, prepared: Prepared, available: dict[str, Any], *, show_progress: bool
    ) -> None:
        import ray

        from testbed.audit.leakage import LeakageLog
        from testbed.audit.queue import AuditQueue
        from testbed.runtime.cluster import check_resources
        from testbed.runtime.tree import build_tree
        from testbed.runtime.workers import WorkerPool

        self.experiment = experiment
        self.tracker = prepared.tracker
        self.dataset = prepared.data.dataset
        self.params = prepared.params
        self.history = prepared.history
        self.start_round = prepared.start_round
        self.state = prepared.state
        self.leakage: dict[str, dict[str, float]] = {}
        self.loop_seconds = 0.0
        self.privacy = privacy_plan(experiment, prepared.data.partition.sizes())
        size = check_resources(experiment.resources, available, auditing=experiment.attack is not None)
        data_ref = ray.put({"x": self.dataset.train_x, "y": self.dataset.train_y})
        self.pool = WorkerPool(experiment, data_ref, ray.put(prepared.data.partition), self.dataset.num_classes, size)
        self.worker_nodes = self.pool.nodes()
        attack_workers, self.audit_actors, scorers = self._start_audit_actors(data_ref)
        self.tree = build_tree(experiment, attack_workers)
        self.eval_model = model_for(experiment.model, self.dataset.input_shape, self.dataset.num_classes)
        self.test_x, self.test_y = torch.as_tensor(self.dataset.test_x), torch.as_tensor(self.dataset.test_y)
        attacks = experiment.attack.names if experiment.attack is not None else []
        self.leakage_log = LeakageLog(self.dataset, self.tracker, "", attacks)
        self.leakage_log.restore(self.state.get("audits", {}))
        self.precision = self._precision_target()
        self.audits = AuditQueue(scorers, self._on_round)
        self.progress = Progress(experiment.rounds, experiment.name, enabled=show_progress)
        self.progress.start_at(self.start_round)
        self.run_id = ""

    def _precision_target(self) -> PrecisionTarget | None:
        """The per-window intervals that size the audits, with ``attack.audit.target_half_width``."""
        from testbed.audit.precision import PrecisionTarget

        attack = self.experiment.attack
        half_width = attack.audit.target_half_width if attack is not None else None
        if attack is None or half_width is None:
            return None
        audit = attack.audit
        groups = audit.groups if audit.groups is not None else [group.group for group in self.experiment.clients]
        target = PrecisionTarget(half_width, audit.window, audit.backlog, groups)
        target.restore(self.state.get("audits", {}).get("precision", {}))
        return target

    def _on_round(self, round_index: int, audits: list[Any], failed: int) -> None:
        """A round's scored audits, released by the audit queue in round order: leakage, then the intervals."""
        cases = self.leakage_log.record(round_index, audits, failed)
        if self.precision is not None and cases:
            self.tracker.log_metrics(self.run_id, self.precision.observe(round_index, cases), step=round_index + 1)

    def _start_audit_actors(self, data_ref: Any) -> tuple[list[str], list[Any], list[Any]]:
        """The attack actors (named, so aggregators can reach them) and the scorers; none without an attack."""
        if self.experiment.attack is None:
            return [], [], []
        import ray

        from testbed.audit.attack_worker import AttackWorker
        from testbed.audit.grid import GRID_MAX_CLIENTS
        from testbed.audit.scoring import LeakageScorer

        resources = self.experiment.resources.attack
        attack_class = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)(AttackWorker)
        token = uuid.uuid4().hex[:12]
        names = [f"testbed-attack-{token}-{index}" for index in range(resources.workers)]
        shape, classes = self.dataset.input_shape, self.dataset.num_classes
        actors: list[Any] = [attack_class.options(name=name).remote(self.experiment, shape, classes) for name in names]
        held_out = {"x": self.dataset.test_x, "y": self.dataset.test_y}  # the baselines' class means and images
        scorers = [
            ray.remote(num_cpus=0)(LeakageScorer).remote(
                data_ref, resources.nice, GRID_MAX_CLIENTS, held_out, self.experiment.seed
            )
            for _ in range(resources.scorers)
        ]
        actors += scorers
        ray.get([actor.__ray_ready__.remote() for actor in actors])
        return names, actors, scorers

    def open_run(
        self, resume_run_id: str | None, parent_run_id: str | None, name: str, tags: Mapping[str, str] | None
    ) -> None:
        """Create the MLflow run with its parameters and resolved config, or continue ``resume_run_id``."""
        if resume_run_id is None:
            params = flatten(self.experiment.model_dump(mode="json"))
            self.run_id = self.tracker.start_run(name, params, parent_run_id=parent_run_id, tags=tags)
            self.tracker.log_text(self.run_id, resolved_yaml(self.experiment), "config.yaml")
        else:
            self.run_id = resume_run_id
        self.leakage_log.run_id = self.run_id

    def execute(self) -> RunResult:
        """Every remaining round, then the final records; the actors are stopped and the run closed either way."""
        status = "FAILED"
        try:
            started = time.perf_counter()
            for round_index in range(self.start_round, self.experiment.rounds):
                self.round(round_index)
            self.finish()
            self.loop_seconds = time.perf_counter() - started
            status = "FINISHED"
        except TrackingUnavailable as exc:
            status = "UNREACHABLE"
            raise RunAborted(f"{exc}; resume with: testbed run --resume {self.run_id}") from None
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.close(status)
        return RunResult(
            self.run_id,
            self.params,
            self.history,
            self.worker_nodes,
            self.leakage,
            self.loop_seconds,
        )

    def round(self, round_index: int) -> None:
        """One round: sample, simulate, aggregate, audit, evaluate, log, checkpoint."""
        started = time.perf_counter()
        sampled, audited, audit_wait, skipped = self.sample(round_index)
        summaries, new_params = self.simulate_and_aggregate(round_index, sampled, audited)
        metrics = round_metrics(summaries, self.experiment)
        metrics.update(privacy_metrics(self.privacy, round_index + 1))
        check_accepted(metrics["accepted"], self.experiment, round_index)
        self.params = new_params
        seconds = time.perf_counter() - started
        metrics.update(
            round_seconds=seconds,
            clients_per_second=len(sampled) / seconds if seconds > 0 else 0.0,
            workers_replaced=self.pool.replaced,
        )
        if self.experiment.attack is not None:
            metrics["audit/wait_seconds"] = audit_wait
            metrics["audit/skipped_clients"] = float(skipped)
        metrics.update(self.evaluate(round_index))
        self.log(round_index, metrics)
        self.checkpoint(round_index)
        self.tracker.flush()
        shown = {"acc": metrics["test_accuracy"]} if "test_accuracy" in metrics else {}
        leaked = {f"rec[{group}]": value for group, value in self.leakage_log.take_fresh().items()}
        self.progress.update(round_index + 1, {**shown, **leaked, "s/round": seconds})

    def sample(self, round_index: int) -> tuple[np.ndarray, np.ndarray, float, int]:
        """The round's clients and those audited; with a full audit backlog, wait or skip the audits."""
        from testbed.audit.queue import make_room

        sampled = sample_clients(self.experiment, round_index)
        wait, skipped, settled = 0.0, 0, frozenset[str]()
        if self.precision is not None:  # decide from the audits of rounds up to round - backlog, all of them
            started = time.perf_counter()
            self.audits.wait_through(round_index - self.precision.lag)
            wait, settled = time.perf_counter() - started, self.precision.settled(round_index)
        audited = audited_clients(self.experiment, round_index, sampled, settled)
        if len(audited) and self.experiment.attack is not None:
            waited, skipped = make_room(self.audits, self.experiment.attack.audit, len(audited))
            wait += waited
            audited = audited[:0] if skipped else audited
        return sampled, audited, wait, skipped

    def simulate_and_aggregate(
        self, round_index: int, sampled: np.ndarray, audited: np.ndarray
    ) -> tuple[list[ChunkSummary], Params]:
        """Chunks on the worker pool, their sums up the aggregation tree; audited updates go to the attackers."""
        import ray

        tasks = make_tasks(self.experiment, round_index, sampled, audited)
        params_ref = ray.put(self.params)
        summaries, payload_refs, audited_refs = self.pool.run_round(params_ref, tasks)
        new_params, audit_refs = self.tree.aggregate(params_ref, summaries, payload_refs, audited_refs)
        self.audits.expect(round_index, self.tree.ground_truth(summaries), audit_refs)
        return summaries, new_params

    def evaluate(self, round_index: int) -> dict[str, float]:
        """Test loss and accuracy of the new global model on evaluation rounds (and after the last)."""
        last = round_index + 1 == self.experiment.rounds
        if (round_index + 1) % self.experiment.evaluation.every != 0 and not last:
            return {}
        started = time.perf_counter()
        batch = self.experiment.evaluation.batch_size
        loss, accuracy = evaluate(self.eval_model, self.params, self.test_x, self.test_y, batch)
        return {"test_loss": loss, "test_accuracy": accuracy, "eval_seconds": time.perf_counter() - started}

    def log(self, round_index: int, metrics: dict[str, float]) -> None:
        """Queue the round's metrics, take the audits that are back, and keep the round in the history."""
        self.tracker.queue(self.run_id, metrics, step=round_index + 1)
        self.audits.collect(wait=False)
        self.history.append({"round": round_index + 1, **metrics})

    def checkpoint(self, round_index: int) -> None:
        """Everything needed to resume after this round, including metrics MLflow has not taken yet."""
        save_checkpoint(
            checkpoint_path(self.experiment.tracking.checkpoints, self.run_id),
            {
                "round": round_index + 1,
                "params": self.params,
                "history": self.history,
                "config": self.experiment.model_dump(mode="json"),
                "pending_metrics": list(self.tracker.pending),
                "audits": {
                    **self.leakage_log.state(),
                    **({"precision": self.precision.state()} if self.precision is not None else {}),
                },
            },
        )

    def finish(self) -> None:
        """Wait for the last audits; log the final model, summary, leakage per group and the run's description."""
        self.audits.collect(wait=True)
        self.leakage_log.finish()
        self.tracker.flush()
        self.leakage = self.leakage_log.summary_by_group()
        log_final(self.tracker, self.run_id, self.experiment, self.params, self.history)
        intervals = self.precision.latest() if self.precision is not None else {}
        note = run_note(self.experiment, self.history, self.leakage, self.leakage_log.grids, intervals)
        if self.audits.failed:
            failed = self.audits.failed
            note += f"\n\n**{failed} audit tasks failed**; their clients are not in these numbers (see the log)."
        self.tracker.set_note(self.run_id, note)

    def close(self, status: str) -> None:
        """Stop the workers, aggregators and audit actors; close the MLflow run (unless MLflow is unreachable)."""
        import ray

        self.progress.close()
        self.pool.shutdown()
        self.tree.shutdown()
        for actor in self.audit_actors:
            ray.kill(actor)
        if status != "UNREACHABLE" and self.run_id:
            self.tracker.end_run(self.run_id, status)
