"""Training one study run in one process with the simulator's own client code, keeping checkpoints.

A study run is an ordinary experiment (one client group, no attack) trained round by round with
``simulate_chunk``, the function the engine's Ray workers run, and the engine's own server step
(``testbed.runtime.round_step``: the ``min_clients`` check, the server step, BatchNorm buffers averaged
beside it). The global model is kept at every evaluation round so that the
audits can pick their stages after training, from the accuracy curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from testbed.config.schema import Experiment
from testbed.runtime.local_update import evaluate
from testbed.runtime.models import model_for
from testbed.runtime.preparation import PreparedData, initial_params
from testbed.runtime.records import ChunkSummary, Params
from testbed.runtime.round_metrics import round_metrics
from testbed.runtime.round_step import check_accepted, global_step
from testbed.runtime.scheduling import make_tasks, sample_clients
from testbed.runtime.simulation import SimulationContext, simulate_chunk


@dataclass
class TrainedRun:
    """Accuracy after each evaluation round, the global model at those rounds, batch statistics, seconds."""

    accuracy: dict[int, float] = field(default_factory=dict)  # round (0 = initial model) -> test accuracy
    snapshots: dict[int, Params] = field(default_factory=dict)  # round -> global parameters after it
    short_batches: int = 0
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """Test accuracy of the last evaluated model."""
        return self.accuracy[max(self.accuracy)] if self.accuracy else float("nan")


def train(experiment: Experiment, data: PreparedData, *, keep: bool = True, threads: int = 1) -> TrainedRun:
    """Every round of ``experiment`` on one process; evaluation on ``evaluation.every`` rounds and the last.

    ``keep`` stores the global parameters at every evaluated round (and the initial model as round 0).
    """
    torch.set_num_threads(threads)
    started = time.perf_counter()
    dataset = data.dataset
    context = SimulationContext.build(experiment, dataset.train_x, dataset.train_y, data.partition, dataset.num_classes)
    model = model_for(experiment.model, dataset.input_shape, dataset.num_classes)
    test_x, test_y = torch.as_tensor(dataset.test_x), torch.as_tensor(dataset.test_y)
    params = initial_params(experiment, dataset)
    result = TrainedRun()
    batch = experiment.evaluation.batch_size

    def record(round_number: int) -> None:
        result.accuracy[round_number] = evaluate(model, params, test_x, test_y, batch)[1]
        if keep:
            result.snapshots[round_number] = {key: value.clone() for key, value in params.items()}

    record(0)
    no_audit = np.empty(0, dtype=np.int64)
    for round_index in range(experiment.rounds):
        sampled = sample_clients(experiment, round_index)
        outputs = [
            simulate_chunk(context, params, task) for task in make_tasks(experiment, round_index, sampled, no_audit)
        ]
        summaries: list[ChunkSummary] = [summary for summary, _ in outputs]
        result.short_batches += sum(summary.short_batches for summary in summaries)
        check_accepted(round_metrics(summaries, experiment)["accepted"], experiment, round_index)
        params, _ = global_step(params, [payload for _, payload in outputs], experiment.algorithm)
        number = round_index + 1
        if number % experiment.evaluation.every == 0 or number == experiment.rounds:
            record(number)
    result.seconds = time.perf_counter() - started
    return result
