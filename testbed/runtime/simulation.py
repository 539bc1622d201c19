"""Simulating one chunk of virtual clients: batching, local update, defences, validation, summation.

This is what a ``ClientWorker`` runs, written without Ray so it can be tested and benchmarked alone.
Every random choice of a client comes from ``rng(seed, round, client)``, so a client's update does not
depend on which worker simulates it or which other clients share its chunk.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from attacks.registry import ATTACKS
from defenses import DefencePolicy, build_policy, expected_batch_size, poisson_sample, sample_rate
from testbed.config.schema import ClientGroupConfig, Experiment
from testbed.data.partition import Partition
from testbed.runtime.buffers import buffer_contribution, split_state, stateful_update
from testbed.runtime.dp_update import dp_local_steps, dp_updates
from testbed.runtime.faults import corrupt_values, malformed
from testbed.runtime.fused import dense_deltas, fused_trace, is_dense_stack, low_rank_cheaper
from testbed.runtime.local_update import StackedBatches, stacked_deltas, stacked_gradients, weighted_sum
from testbed.runtime.low_rank import Factors, worth_factoring
from testbed.runtime.models import model_for
from testbed.runtime.records import ChunkPayload, ChunkSummary, ChunkTask, ClientUpdate, Params
from testbed.runtime.validation import structure_problem, validate_stack

STREAM_BATCHES = 0
STREAM_BEHAVIOUR = 1
STREAM_NOISE = 2
STREAM_DP_NOISE = 3


def client_rng(seed: int, round_index: int, client: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of one client in one round."""
    return np.random.default_rng([seed, round_index, client, stream])


@dataclass
class GroupRuntime:
    """A client group as the simulator needs it: its config and its built defence policy."""

    config: ClientGroupConfig
    policy: DefencePolicy
    first_client: int


@dataclass
class SimulationContext:
    """Everything a worker holds for the whole run: model architecture, data, partition, groups."""

    experiment: Experiment
    model: nn.Module
    train_x: Tensor
    train_y: Tensor
    labels: np.ndarray
    partition: Partition
    groups: list[GroupRuntime]
    device: torch.device
    dense_stack: bool = False
    factor_audits: bool = False  # every attack reads factored weights (Attack.reads_factors)

    @classmethod
    def build(
        cls,
        experiment: Experiment,
        train_x: np.ndarray,
        train_y: np.ndarray,
        partition: Partition,
        num_classes: int,
        device: str = "cpu",
    ) -> SimulationContext:
        """Build the context from the experiment and the (shared, read-only) training arrays."""
        model = model_for(experiment.model, train_x.shape[1:], num_classes).to(device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.as_tensor(train_x).to(device)
            y = torch.as_tensor(train_y).to(device)
        groups = []
        first = 0
        for group in experiment.clients:
            groups.append(GroupRuntime(group, build_policy(group.defence), first))
            first += group.count
        return cls(
            experiment=experiment,
            model=model,
            train_x=x,
            train_y=y,
            labels=np.asarray(train_y),
            partition=partition,
            groups=groups,
            device=torch.device(device),
            dense_stack=is_dense_stack(model),
            factor_audits=experiment.attack is not None
            and all(getattr(ATTACKS.get(name), "reads_factors", False) for name in experiment.attack.names),
        )

    def num_batches(self, samples: int, batch_size: int) -> tuple[int, int]:
        """(epochs to plan, batches per epoch) of one client's local work under the algorithm."""
        algorithm = self.experiment.algorithm
        per_epoch = max(1, math.ceil(samples / batch_size))
        if algorithm.name == "fedsgd":
            return 1, 1
        if algorithm.local_steps is not None:
            return math.ceil(algorithm.local_steps / per_epoch), per_epoch
        return algorithm.local_epochs or 1, per_epoch


def plan_batches(
    context: SimulationContext, group: GroupRuntime, clients: np.ndarray, round_index: int
) -> tuple[np.ndarray, int]:
    """Global sample indices (C, S, B) of every client's local batches, -1 for padding; and short batches.

    A DP-SGD group draws each of its ``dp_local_steps`` batches by Poisson sampling (a batch may be empty).
    """
    seed = context.experiment.seed
    batch_size = group.config.batch_size
    algorithm = context.experiment.algorithm
    per_client: list[list[np.ndarray]] = []
    short = 0
    for client in clients:
        owned = context.partition.client(int(client))
        rng = client_rng(seed, round_index, int(client), STREAM_BATCHES)
        if group.policy.dp is not None:
            rate = sample_rate(len(owned), batch_size)
            steps = dp_local_steps(algorithm, len(owned), batch_size)
            per_client.append([owned[poisson_sample(len(owned), rate, rng)] for _ in range(steps)])
            continue
        epochs, per_epoch = context.num_batches(len(owned), batch_size)
        batches: list[np.ndarray] = []
        for _ in range(epochs):
            plan = group.policy.batching.plan(context.labels[owned], batch_size, per_epoch, rng)
            short += plan.short
            batches.extend(owned[positions] for positions in plan.batches)
        if algorithm.name == "fedavg" and algorithm.local_steps is not None:
            batches = batches[: algorithm.local_steps]
        per_client.append(batches)
    steps = max(len(batches) for batches in per_client)
    width = max(1, max((len(batch) for batches in per_client for batch in batches), default=1))
    index = np.full((len(clients), steps, width), -1, dtype=np.int64)
    for row, batches in enumerate(per_client):
        for step, batch in enumerate(batches):
            index[row, step, : len(batch)] = batch
    return index, short


def gather(context: SimulationContext, index: np.ndarray) -> StackedBatches:
    """Stack the samples named by ``index`` (padding -1 becomes a zero-weight copy of sample 0)."""
    flat = torch.from_numpy(index).to(context.device)
    mask = flat >= 0
    safe = flat.clamp_min(0)
    return StackedBatches(x=context.train_x[safe], y=context.train_y[safe], w=mask.to(context.train_x.dtype))


def _behaviour(
    context: SimulationContext, group: GroupRuntime, clients: np.ndarray, round_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per client: (dropped, delay seconds, sends a faulty update), all drawn from its own stream."""
    seed = context.experiment.seed
    config = group.config
    if config.dropout == 0 and config.straggler_delay_s == 0 and config.faults.fraction == 0:
        quiet = np.zeros(len(clients), dtype=bool)
        return quiet, np.zeros(len(clients)), quiet
    draws = np.array([client_rng(seed, round_index, int(c), STREAM_BEHAVIOUR).random(3) for c in clients]).reshape(
        len(clients), 3
    )
    dropped = draws[:, 0] < group.config.dropout
    mean_delay = group.config.straggler_delay_s
    delay = -mean_delay * np.log1p(-draws[:, 1]) if mean_delay > 0 else np.zeros(len(clients))
    faulty = draws[:, 2] < group.config.faults.fraction
    return dropped, delay, faulty


def _local_updates(
    context: SimulationContext,
    group: GroupRuntime,
    params: Params,
    clients: np.ndarray,
    round_index: int,
    index: np.ndarray,
    buffers: Params | None = None,
) -> tuple[Params, Tensor, Params]:
    """The clients' updates after their defence transforms (batches ``index``), samples used per step, and
    (for a model with buffers, such as BatchNorm) each client's buffers after its local training."""
    experiment = context.experiment
    batches = gather(context, index)
    loss = group.policy.loss
    trained: Params = {}
    if group.policy.dp is not None:
        update = _dp_updates(context, group, params, clients, round_index, batches)
    elif buffers:  # per-client batch statistics and buffers (testbed.runtime.buffers)
        lr = None if experiment.algorithm.name == "fedsgd" else experiment.algorithm.lr
        update, trained = stateful_update(context.model, loss, params, buffers, batches, lr)
    elif experiment.algorithm.name == "fedsgd":
        update = stacked_gradients(context.model, loss, params, batches)
    elif context.dense_stack:  # dense model, too many local steps to fuse: per-client weights updated in place
        update = dense_deltas(context.model, loss, params, batches, experiment.algorithm.lr)
    else:
        update = stacked_deltas(context.model, loss, params, batches, experiment.algorithm.lr)
    if group.policy.transforms:
        generators = [
            torch.Generator().manual_seed(
                int(client_rng(experiment.seed, round_index, int(c), STREAM_NOISE).integers(2**62))
            )
            for c in clients
        ]
        update = group.policy.transform(update, generators)
    return update, batches.w.sum(dim=2), trained


def _dp_updates(
    context: SimulationContext,
    group: GroupRuntime,
    params: Params,
    clients: np.ndarray,
    round_index: int,
    batches: StackedBatches,
) -> Params:
    """The DP-SGD updates of a chunk's clients, with each client's noise from its own stream."""
    dp = group.policy.dp
    assert dp is not None
    experiment = context.experiment
    batch_size = group.config.batch_size
    held = [len(context.partition.client(int(c))) for c in clients]
    steps = [dp_local_steps(experiment.algorithm, n, batch_size) for n in held]
    normaliser = torch.tensor([expected_batch_size(n, batch_size) for n in held], device=context.device)
    generators = [
        torch.Generator().manual_seed(
            int(client_rng(experiment.seed, round_index, int(c), STREAM_DP_NOISE).integers(2**62))
        )
        for c in clients
    ]
    lr = None if experiment.algorithm.name == "fedsgd" else experiment.algorithm.lr
    return dp_updates(context.model, group.policy.loss, dp, params, batches, steps, normaliser, generators, lr)


def _screen(
    update: Params, params: Params, inject: Tensor, fault: str, max_norm: float | None, summary: ChunkSummary
) -> Tensor:
    """Validate every client's update as sent (faults injected); count rejections; return the accept mask."""
    accept, reasons = validate_stack(update, params, max_norm)
    for row in inject.nonzero().flatten().tolist() if fault in ("shape", "dtype") else []:
        problem = structure_problem(malformed(update, row, fault), params)
        if problem is not None and bool(accept[row]):
            accept[row] = False
            summary.rejected[problem] += 1
    for reason, mask in reasons.items():
        summary.rejected[reason] += int(mask.sum())
    summary.accepted = int(accept.sum())
    return accept


def _hand_off(
    context: SimulationContext,
    group: GroupRuntime,
    task: ChunkTask,
    clients: np.ndarray,
    index: np.ndarray,
    used: Tensor,
    update: Params,
    summary: ChunkSummary,
    payload: ChunkPayload,
    factors: list[dict[str, Factors]] | None = None,
) -> None:
    """Pass the audited clients' raw updates to the aggregator; keep their sample indices as ground truth.

    ``factors`` (per row of ``clients``) holds the weights sent as a thin SVD instead of in ``update``.
    """
    experiment = context.experiment
    audited = {int(c) for c in task.audited}
    public_labels = experiment.attack is not None and experiment.attack.labels_known
    for row, client in enumerate(clients):
        if int(client) not in audited:
            continue
        rows = index[row][index[row] >= 0]
        if len(rows) == 0:
            continue  # a DP-SGD client whose Poisson batches all came out empty sent pure noise: nothing to audit
        summary.ground_truth[int(client)] = rows
        payload.audited.append(
            ClientUpdate(
                client=int(client),
                group=group.config.group,
                round=task.round,
                update={key: value[row].detach().cpu() for key, value in update.items()},  # a view: pickled alone
                num_samples=len(rows),
                batch_size=group.config.batch_size,
                local_steps=int((used[row] > 0).sum()),
                labels=context.labels[rows] if public_labels else None,
                factors=factors[row] if factors is not None else {},
            )
        )


def _client_weights(context: SimulationContext, group: GroupRuntime, clients: np.ndarray, used: Tensor) -> Tensor:
    """Each client's aggregation weight: its batch size (FedSGD) or the samples it holds (FedAvg).

    Under DP-SGD a FedSGD weight is the expected batch size: the sampled size is not private.
    """
    fedsgd = context.experiment.algorithm.name == "fedsgd"
    if fedsgd and group.policy.dp is None:
        return used[:, 0]
    held: list[float] = [len(context.partition.client(int(c))) for c in clients]
    if fedsgd:
        held = [expected_batch_size(int(n), group.config.batch_size) for n in held]
    return torch.tensor(held, dtype=used.dtype, device=used.device)


def _fused_chunk(
    context: SimulationContext,
    group: GroupRuntime,
    params: Params,
    clients: np.ndarray,
    index: np.ndarray,
    task: ChunkTask,
    summary: ChunkSummary,
    payload: ChunkPayload,
) -> bool:
    """Run the chunk by the fused dense-layer path; True when done (every client's update accepted), False to
    run it client by client.

    Norms (Gram matrices) are formed only under ``max_update_norm``; a non-finite update shows in the sum.
    """
    algorithm = context.experiment.algorithm
    by_step = gather(context, np.ascontiguousarray(index.transpose(1, 0, 2)))  # each step's rows contiguous
    batches = StackedBatches(by_step.x.transpose(0, 1), by_step.y.transpose(0, 1), by_step.w.transpose(0, 1))
    lr = None if algorithm.name == "fedsgd" else algorithm.lr
    trace = fused_trace(context.model, group.policy.loss, params, batches, lr)
    if algorithm.max_update_norm is not None:
        norms = trace.norms()
        if not bool(torch.isfinite(norms).all()) or bool((norms > algorithm.max_update_norm).any()):
            return False
    used = batches.w.sum(dim=2)
    weights = _client_weights(context, group, clients, used)
    total = trace.weighted_sum(weights)
    if not all(bool(torch.isfinite(value).all()) for value in total.values()):
        return False  # some client's update is not finite (or the sum overflowed): screen one by one
    summary.accepted = len(clients)
    payload.weighted_sum = {key: value.cpu() for key, value in total.items()}
    payload.weight = summary.weight = float(weights.sum())
    audited = set(task.audited.tolist())
    rows = [row for row, client in enumerate(clients) if int(client) in audited]
    if rows:
        chosen = torch.tensor(rows, device=batches.x.device)
        first = trace.layers[0]
        shape = params[first.weight_key].shape
        # sent as a thin SVD, never formed, when every attack reads it so (the others would multiply it out)
        factored = context.factor_audits and worth_factoring(trace.samples(), shape[0], shape[1])
        update = trace.per_client(chosen, frozenset({first.weight_key}) if factored else frozenset())
        factors = [{first.weight_key: pair} for pair in trace.factors(chosen)] if factored else None
        _hand_off(context, group, task, clients[rows], index[rows], used[chosen], update, summary, payload, factors)
    return True


def _fused_path_applies(context: SimulationContext, group: GroupRuntime, index: np.ndarray) -> bool:
    """Whether a group's chunk can skip per-client parameters and gradients (see testbed.runtime.fused)."""
    steps, width = index.shape[1], index.shape[2]  # FedSGD plans one step
    return (
        context.dense_stack
        and not group.policy.transforms
        and group.policy.dp is None
        and group.config.faults.fraction == 0
        and (steps == 1 or low_rank_cheaper(context.model, steps * width))  # one step needs no corrections
    )


def simulate_chunk(context: SimulationContext, params: Params, task: ChunkTask) -> tuple[ChunkSummary, ChunkPayload]:
    """Run one chunk of clients for one round and return its counts and its weighted update sum."""
    started = time.perf_counter()
    group = context.groups[task.group]
    experiment = context.experiment
    name = group.config.group
    summary = ChunkSummary(index=task.index, group=name, sampled=len(task.clients))
    payload = ChunkPayload(index=task.index, group=name, weighted_sum=None, weight=0.0)
    dropped, delay, faulty = _behaviour(context, group, task.clients, task.round)
    timeout = experiment.sampling.round_timeout_s
    late = (~dropped) & (delay > timeout) if timeout is not None else np.zeros(len(task.clients), dtype=bool)
    summary.dropped = int(dropped.sum())
    summary.late = int(late.sum())
    active = ~(dropped | late)
    summary.max_delay_s = float(delay[active].max()) if active.any() else 0.0
    clients = task.clients[active]
    if len(clients) == 0:
        summary.seconds = time.perf_counter() - started
        return summary, payload
    params, buffers = split_state(context.model, {key: value.to(context.device) for key, value in params.items()})
    index, summary.short_batches = plan_batches(context, group, clients, task.round)
    fused = _fused_path_applies(context, group, index)
    if fused and _fused_chunk(context, group, params, clients, index, task, summary, payload):
        summary.seconds = time.perf_counter() - started
        return summary, payload
    update, used, trained = _local_updates(context, group, params, clients, task.round, index, buffers)
    fault = group.config.faults.kind
    inject = torch.from_numpy(faulty[active]).to(context.device)
    update = corrupt_values(update, inject, fault)
    accept = _screen(update, params, inject, fault, experiment.algorithm.max_update_norm, summary)
    samples = _client_weights(context, group, clients, used)
    if summary.accepted:
        kept = samples[accept]
        accepted = update if bool(accept.all()) else {key: value[accept] for key, value in update.items()}
        payload.weighted_sum = {key: value.cpu() for key, value in weighted_sum(accepted, kept).items()}
        payload.weight = summary.weight = float(kept.sum())
        if trained:
            payload.buffers = {key: value.cpu() for key, value in buffer_contribution(trained, samples, accept).items()}
    if fault in ("shape", "dtype"):
        keep = ~faulty[active]  # a malformed update cannot be read, so it cannot be attacked either
        clients, index, used = clients[keep], index[keep], used[torch.from_numpy(keep).to(used.device)]
        update = {key: value[torch.from_numpy(keep).to(value.device)] for key, value in update.items()}
    _hand_off(context, group, task, clients, index, used, update, summary, payload)
    summary.seconds = time.perf_counter() - started
    return summary, payload
