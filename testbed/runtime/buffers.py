"""Models with buffers (BatchNorm running statistics): per-client training and how buffers are aggregated.

The global state of such a model is its parameters and its buffers, both keyed by their module names
(``bn1.weight``, ``bn1.running_mean``, ``bn1.num_batches_tracked``). Clients send updates of the parameters
only; the buffers travel beside them.

Training, vectorised over the clients of a chunk: ``vmap`` over clients of ``grad`` of the batch loss, with
``functional_call`` given the parameters and each client's own copy of the buffers. In train mode BatchNorm
normalises with the statistics of the client's batch and updates that client's running statistics in place
(``running = (1 - momentum) running + momentum batch statistic``, running_var from the unbiased batch
variance, ``num_batches_tracked += 1``), exactly as ``model.train()`` does for one client. Batch statistics
mix the samples of a batch, so padding samples cannot be used: at each local step the clients are grouped
by the number of real samples in their batch and each group is one ``vmap`` call over batches of exactly
that size. A step whose batch has a single sample where a layer sees one value per channel (PyTorch refuses
to normalise that) is skipped: the client keeps its weights and statistics for that step.

Aggregation rule: floating-point buffers (running_mean, running_var) become the weighted mean of the
accepted clients' buffers after their local training, with the clients' aggregation weights (FedAvg: the
samples each holds; FedSGD: its batch size), as FedAvg averages parameters; integer buffers
(num_batches_tracked) become the largest value among the accepted clients. Chunks and edge aggregators
forward the weighted sum and the maximum, which compose. A round with no accepted client keeps the global
buffers; the server learning rate applies to the parameters only. Evaluation runs in eval mode with the
aggregated running statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from defenses import Loss
from testbed.runtime.local_update import StackedBatches
from testbed.runtime.records import Params

SINGLE_SAMPLE_REFUSAL = "Expected more than 1 value per channel"
"""PyTorch's message when train-mode batch normalisation sees one value per channel."""


def buffer_names(model: nn.Module) -> list[str]:
    """The names of every buffer of ``model`` (as ``functional_call`` and ``named_buffers`` spell them)."""
    return [name for name, _ in model.named_buffers()]


def initial_state(model: nn.Module) -> Params:
    """The model's parameters and buffers, detached copies keyed by name: the global state of round 0."""
    state = {name: value.detach().clone() for name, value in model.named_parameters()}
    state.update({name: value.detach().clone() for name, value in model.named_buffers()})
    return state


def split_state(model: nn.Module, state: Params) -> tuple[Params, Params]:
    """``(parameters, buffers)`` of a global state."""
    names = set(buffer_names(model))
    params = {key: value for key, value in state.items() if key not in names}
    buffers = {key: value for key, value in state.items() if key in names}
    return params, buffers


def check_vectorisable(model: nn.Module) -> None:
    """Refuse buffers the vectorised path cannot keep per client (ValueError, one line).

    BatchNorm with ``momentum=None`` keeps a cumulative average whose factor is read from
    ``num_batches_tracked`` as a Python number, which a per-client (batched) counter cannot give.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            if module.momentum is None:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) has momentum=None (a cumulative average), which "
                    "per-client vectorised training cannot keep; give it a momentum (PyTorch's default is 0.1)"
                )


def _stacked(values: Params, clients: int) -> Params:
    """A private copy of every tensor for each of ``clients`` clients (leading client dimension)."""
    return {key: value.unsqueeze(0).repeat(clients, *[1] * value.dim()) for key, value in values.items()}


def _size_groups(sizes: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(real samples, client rows)`` for every batch size present at one step (clients without a batch: none)."""
    for size in torch.unique(sizes).tolist():
        if size > 0:
            yield int(size), (sizes == size).nonzero().flatten()


def _batch_loss(model: nn.Module, loss: Loss) -> Callable[[Params, Params, Tensor, Tensor], Tensor]:
    """The mean loss of one client's batch as a function of its parameters and (updated in place) buffers."""

    def batch_loss(params: Params, buffers: Params, x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, {**params, **buffers}, (x,))
        return loss.per_sample(logits, y).mean()

    return batch_loss


def stateful_update(
    model: nn.Module, loss: Loss, params: Params, buffers: Params, batches: StackedBatches, lr: float | None
) -> tuple[Params, Params]:
    """Each client's update and its buffers after local training, both stacked by client.

    ``lr`` None: FedSGD, the gradient of the first batch; else FedAvg, the weight delta after SGD steps of
    size ``lr``. The model must be in train mode. See the module docstring for the grouping by batch size.
    """
    clients = batches.clients
    own_buffers = _stacked(buffers, clients)
    per_client = vmap(grad(_batch_loss(model, loss)), in_dims=(None, 0, 0, 0))
    moved = vmap(grad(_batch_loss(model, loss)), in_dims=(0, 0, 0, 0))
    sizes = batches.w.sum(dim=2).round().long()
    real_first = torch.argsort(batches.w, dim=2, descending=True, stable=True)
    local: Params | None = None
    update: Params = {
        key: torch.zeros((clients, *value.shape), dtype=value.dtype, device=value.device)
        for key, value in params.items()
    }
    for step in range(1 if lr is None else batches.steps):
        for size, rows in _size_groups(sizes[:, step]):
            every = len(rows) == clients and size > 1  # a single-sample step may be refused midway: use copies
            positions = real_first[rows, step, :size]
            x = batches.x[rows[:, None], step, positions]
            y = batches.y[rows[:, None], step, positions]
            group_buffers = own_buffers if every else {key: value[rows] for key, value in own_buffers.items()}
            try:
                if local is None:
                    grads = per_client(params, group_buffers, x, y)
                else:
                    group_params = local if every else {key: value[rows] for key, value in local.items()}
                    grads = moved(group_params, group_buffers, x, y)
            except ValueError as exc:
                if size == 1 and SINGLE_SAMPLE_REFUSAL in str(exc):
                    continue  # the step is skipped (module docstring)
                raise
            if not every:
                for key, value in group_buffers.items():
                    own_buffers[key][rows] = value
            target = update if lr is None else local
            if target is None:  # the first FedAvg step: every client starts from the global parameters
                local = _stacked(params, clients)
                target = local
            for key, value in grads.items():
                if lr is None:
                    target[key][rows] = value
                else:
                    target[key].index_add_(0, rows, value, alpha=-lr)
    if lr is not None and local is not None:
        update = {key: local[key] - params[key].unsqueeze(0) for key in params}
    return update, own_buffers


def buffer_contribution(client_buffers: Params, weights: Tensor, accept: Tensor) -> Params:
    """A chunk's share of the buffers: the weighted sum of the accepted clients' floating-point buffers
    (aggregation weights ``weights``) and the largest value of each integer buffer."""
    share: Params = {}
    for key, value in client_buffers.items():
        kept = value[accept]
        if value.is_floating_point():
            share[key] = torch.tensordot(weights[accept].to(value.dtype), kept.reshape(kept.shape[0], -1), dims=1)
            share[key] = share[key].reshape(value.shape[1:])
        else:
            share[key] = kept.amax(dim=0)
    return share


def merge_buffers(total: Params | None, share: Params) -> Params:
    """Add a share to a running total: floating-point buffers are summed, integer ones take the maximum."""
    if total is None:
        return {key: value.clone() for key, value in share.items()}
    for key, value in share.items():
        if value.is_floating_point():
            total[key] += value
        else:
            torch.maximum(total[key], value, out=total[key])
    return total


def mean_buffers(total: Params, weight: float) -> Params:
    """The aggregated buffers: floating-point sums divided by the total weight, integer maxima as they are."""
    return {key: value / weight if value.is_floating_point() else value.clone() for key, value in total.items()}
