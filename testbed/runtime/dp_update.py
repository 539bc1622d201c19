"""DP-SGD local training, vectorised over the clients of a chunk and over each client's sampled examples.

Each step's per-example gradients are clipped, summed, noised and normalised as :class:`defenses.DPSGD`
says. Two ways to the clipped sums, the same up to float round-off:

- any model: per-example gradients from ``torch.func``, ``vmap`` over clients of ``vmap`` over examples
  of ``grad`` of one example's loss, formed a slice of clients at a time so that memory stays near
  ``MEMORY_BUDGET`` whatever the chunk size;
- dense models (``testbed.runtime.fused.is_dense_stack``): no per-example gradient is formed. A dense layer
  ``z = W a + b`` gives example i the weight gradient ``d_i a_i^T`` and bias gradient ``d_i``, with
  ``d_i`` the gradient of its loss at ``z_i``. So ``||g_i||^2 = sum over layers of ||d_i||^2 (||a_i||^2 + 1)``
  (Goodfellow 2015), and the clipped sum ``sum_i c_i d_i a_i^T`` is one batched product per layer.

FedSGD sends one noisy step (the privatised gradient). FedAvg takes ``dp_local_steps`` noisy SGD steps
and sends the weight delta. A client's steps beyond its own count (clients of a chunk may differ under
``local_epochs``) leave its weights alone and draw no noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from defenses import DPSGD, Loss
from testbed.config.schema import AlgorithmConfig
from testbed.runtime.fused import dense_forward, is_dense_stack
from testbed.runtime.local_update import StackedBatches
from testbed.runtime.records import Params

MEMORY_BUDGET = 256 * 2**20
"""Bytes of per-example gradients held at once."""


def dp_local_steps(algorithm: AlgorithmConfig, samples: int, batch_size: int) -> int:
    """DP-SGD steps a client with ``samples`` examples takes in a round: 1 (FedSGD), ``local_steps``, or
    ``local_epochs * ceil(samples / batch_size)`` (an epoch is as many steps as the plain batching has batches).
    """
    if algorithm.name == "fedsgd":
        return 1
    if algorithm.local_steps is not None:
        return algorithm.local_steps
    return (algorithm.local_epochs or 1) * max(1, math.ceil(samples / batch_size))


def check_model(model: nn.Module) -> None:
    """Refuse layers that mix examples (batch normalisation): per-example gradients are then undefined."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"defence.dp: DP-SGD needs per-example gradients, but layer {name!r} ({type(module).__name__}) "
                "mixes the examples of a batch; use GroupNorm or LayerNorm"
            )


def _example_loss(model: nn.Module, loss: Loss) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """One example's loss as a function of the parameters."""

    def example_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return loss.per_sample(logits, y.unsqueeze(0))[0]

    return example_loss


def per_example_gradients(
    model: nn.Module, loss: Loss, params: Params, x: Tensor, y: Tensor, *, shared: bool
) -> Params:
    """Gradients (C, W, ...) of every example's loss; ``params`` shared by all clients or stacked by client."""
    per_example = vmap(grad(_example_loss(model, loss)), in_dims=(None, 0, 0))
    per_client = vmap(per_example, in_dims=(None if shared else 0, 0, 0))
    result: Params = per_client(params, x, y)
    return result


def dense_clipped_sums(
    model: nn.Module, loss: Loss, dp: DPSGD, params: Params, batch: tuple[Tensor, Tensor, Tensor], *, shared: bool
) -> Params:
    """Each client's sum of clipped per-example gradients for a dense model, from layer inputs and output signals.

    ``params`` shared by all clients or stacked by client; ``batch`` as in :func:`dp_step`.
    """
    x, y, w = batch
    clients, width = int(x.shape[0]), int(x.shape[1])
    layers = list(model.named_children()) if isinstance(model, nn.Sequential) else [("", model)]
    dense = [  # key prefix of each dense layer, and whether it has a bias
        (f"{name}." if name else "", layer.bias is not None) for name, layer in layers if isinstance(layer, nn.Linear)
    ]

    def output(name: str, layer: nn.Linear, h: Tensor, position: int) -> Tensor:
        prefix = dense[position][0]
        weight = params[prefix + "weight"]
        z = torch.matmul(h, weight.T) if shared else torch.bmm(h, weight.transpose(1, 2))
        if layer.bias is not None:
            bias = params[prefix + "bias"]
            z = z + (bias if shared else bias.unsqueeze(1))
        return z

    h, inputs, outputs = dense_forward(layers, x, output)
    per_example = loss.per_sample(h.reshape(clients * width, -1), y.reshape(-1)).reshape(clients, width)
    signals = torch.autograd.grad((per_example * w).sum(), outputs)  # padding rows: zero signal
    squares = torch.zeros(clients, width, dtype=x.dtype, device=x.device)
    for (_, has_bias), a, d in zip(dense, inputs, signals, strict=True):
        squares = squares + d.pow(2).sum(dim=2) * (a.pow(2).sum(dim=2) + float(has_bias))
    factors = dp.clip_factors(squares.sqrt()).to(x.dtype)
    sums: Params = {}
    for (prefix, has_bias), a, d in zip(dense, inputs, signals, strict=True):
        scaled = d * factors.unsqueeze(2)
        sums[prefix + "weight"] = torch.bmm(scaled.transpose(1, 2), a)
        if has_bias:
            sums[prefix + "bias"] = scaled.sum(dim=1)
    return {key: sums[key] for key in params}  # the parameters' order, which the noise follows


def _slice_size(params: Params, shared: bool, width: int) -> int:
    """Clients whose per-example gradients fit ``MEMORY_BUDGET`` together (at least one)."""
    entries = sum(value[0].numel() if not shared else value.numel() for value in params.values())
    itemsize = next(iter(params.values())).element_size()
    return max(1, MEMORY_BUDGET // max(1, entries * width * itemsize))


def dp_step(
    model: nn.Module,
    loss: Loss,
    dp: DPSGD,
    params: Params,
    batch: tuple[Tensor, Tensor, Tensor],
    normaliser: Tensor,
    generators: Sequence[torch.Generator],
    *,
    shared: bool,
) -> Params:
    """One DP-SGD step of every client: ``(sum of clipped per-example gradients + noise) / normaliser``.

    ``batch`` is (x, y, w) shaped (C, W, ...), (C, W), (C, W) with w 1 for a sampled example, 0 for padding.
    """
    if is_dense_stack(model):
        return dp.privatise(dense_clipped_sums(model, loss, dp, params, batch, shared=shared), normaliser, generators)
    x, y, w = batch
    clients, width = int(x.shape[0]), int(x.shape[1])
    size = _slice_size(params, shared, width)
    pieces: list[Params] = []
    for start in range(0, clients, size):
        rows = slice(start, min(clients, start + size))
        own = params if shared else {key: value[rows] for key, value in params.items()}
        gradients = per_example_gradients(model, loss, own, x[rows], y[rows], shared=shared)
        pieces.append(dp.clipped_sum(gradients, w[rows]))
        del gradients
    summed = pieces[0] if len(pieces) == 1 else {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}
    return dp.privatise(summed, normaliser, generators)


def dp_updates(
    model: nn.Module,
    loss: Loss,
    dp: DPSGD,
    params: Params,
    batches: StackedBatches,
    steps: Sequence[int],
    normaliser: Tensor,
    generators: Sequence[torch.Generator],
    lr: float | None,
) -> Params:
    """Every client's DP-SGD update: the privatised gradient (``lr`` None, FedSGD) or the delta after its steps.

    ``steps[c]`` is client c's number of steps (its batches beyond that are ignored), ``normaliser[c]`` its
    expected batch size, ``generators[c]`` its noise stream.
    """
    check_model(model)
    if lr is None:
        step = (batches.x[:, 0], batches.y[:, 0], batches.w[:, 0])
        return dp_step(model, loss, dp, params, step, normaliser, generators, shared=True)
    counts = torch.tensor(list(steps), device=batches.x.device)
    local = {key: value.unsqueeze(0).repeat(batches.clients, *[1] * value.dim()) for key, value in params.items()}
    for index in range(int(counts.max())):
        active = (counts > index).nonzero().flatten()
        every = len(active) == batches.clients
        chosen = slice(None) if every else active
        batch = (batches.x[chosen, index], batches.y[chosen, index], batches.w[chosen, index])
        mine = generators if every else [generators[int(row)] for row in active]
        if index == 0:  # every client takes a first step, from the shared parameters
            noisy = dp_step(model, loss, dp, params, batch, normaliser, generators, shared=True)
        else:
            own = {key: value[chosen] for key, value in local.items()}
            noisy = dp_step(model, loss, dp, own, batch, normaliser[chosen], mine, shared=False)
        for key, value in local.items():
            if every:
                value.sub_(noisy[key], alpha=lr)
            else:
                value.index_add_(0, active, noisy[key], alpha=-lr)
    return {key: value.sub_(params[key].unsqueeze(0)) for key, value in local.items()}
