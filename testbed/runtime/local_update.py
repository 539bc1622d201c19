"""Local client computation, vectorised over many clients that share a model and a defence policy.

A chunk of clients becomes one stacked tensor computation: ``torch.func.vmap`` over clients of
``torch.func.grad`` of the weighted per-sample loss. Padding samples carry weight 0, so clients with
smaller batches or fewer local steps fit the same stack; a client with no batch at a step keeps its
parameters. ``reference_update`` is the plain one-client autograd loop the vectorised path must match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from defenses import Loss

Params = dict[str, Tensor]


@dataclass(frozen=True)
class StackedBatches:
    """The local batches of C clients: S steps of B (padded) samples each."""

    x: Tensor  # (C, S, B, *input_shape)
    y: Tensor  # (C, S, B) int64
    w: Tensor  # (C, S, B) float: 1 for a real sample, 0 for padding

    @property
    def clients(self) -> int:
        """Number of clients in the stack."""
        return int(self.x.shape[0])

    @property
    def steps(self) -> int:
        """Local steps of the longest client."""
        return int(self.x.shape[1])


def weighted_loss_fn(model: nn.Module, loss: Loss) -> Callable[[Params, Tensor, Tensor, Tensor], Tensor]:
    """The mean per-sample loss of a batch over its real (weight-1) samples, as a function of parameters."""

    def batch_loss(params: Params, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        logits = functional_call(model, params, (x,))
        per_sample = loss.per_sample(logits, y)
        return (per_sample * w).sum() / w.sum().clamp_min(1.0)

    return batch_loss


def stacked_gradients(model: nn.Module, loss: Loss, params: Params, batches: StackedBatches) -> Params:
    """FedSGD: each client's gradient of its single batch, stacked with a leading client dimension."""
    batch_loss = weighted_loss_fn(model, loss)
    per_client = vmap(grad(batch_loss), in_dims=(None, 0, 0, 0))
    result: Params = per_client(params, batches.x[:, 0], batches.y[:, 0], batches.w[:, 0])
    return result


def stacked_deltas(model: nn.Module, loss: Loss, params: Params, batches: StackedBatches, lr: float) -> Params:
    """FedAvg: each client's weight delta after its local SGD steps, stacked by client.

    The first step starts from the shared global parameters, so it runs as one batched forward pass; the
    later steps run on per-client parameters. Updates are applied in place on the stacked parameters.
    """
    batch_loss = weighted_loss_fn(model, loss)
    first = vmap(grad(batch_loss), in_dims=(None, 0, 0, 0))(params, batches.x[:, 0], batches.y[:, 0], batches.w[:, 0])
    local = {name: torch.sub(params[name].unsqueeze(0), first[name], alpha=lr) for name in params}
    del first
    per_client = vmap(grad(batch_loss), in_dims=(0, 0, 0, 0))
    for step in range(1, batches.steps):
        grads = per_client(local, batches.x[:, step], batches.y[:, step], batches.w[:, step])
        for name in local:
            local[name].sub_(grads[name], alpha=lr)
    for name in local:
        local[name].sub_(params[name].unsqueeze(0))
    return local


def reference_update(
    model: nn.Module,
    loss: Loss,
    params: Mapping[str, Tensor],
    batches: list[tuple[Tensor, Tensor]],
    *,
    kind: str,
    lr: float,
) -> Params:
    """One client's update by plain autograd: the gradient of its first batch, or the delta after SGD steps."""
    local = {name: value.detach().clone().requires_grad_(True) for name, value in params.items()}
    for x, y in batches:
        logits = functional_call(model, local, (x,))
        value = loss.per_sample(logits, y).mean()
        grads = torch.autograd.grad(value, list(local.values()))
        if kind == "gradient":
            return {name: g.detach() for name, g in zip(local, grads, strict=True)}
        with torch.no_grad():
            local = {name: (local[name] - lr * g).requires_grad_(True) for name, g in zip(local, grads, strict=True)}
    return {name: (local[name] - params[name]).detach() for name in local}


def flat_norms(update: Params) -> Tensor:
    """Per-client global L2 norm of a stacked update (leading client dimension); one pass per tensor."""
    clients = next(iter(update.values())).shape[0]
    norms = [torch.linalg.vector_norm(value.reshape(clients, -1), dim=1) for value in update.values()]
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


def weighted_sum(update: Params, weights: Tensor) -> Params:
    """sum_c weights[c] * update[c] for every tensor of a stacked update (one matrix-vector product each)."""
    return {
        name: torch.tensordot(weights.to(value.dtype), value.reshape(value.shape[0], -1), dims=1).reshape(
            value.shape[1:]
        )
        for name, value in update.items()
    }


@torch.no_grad()
def evaluate(model: nn.Module, params: Params, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``params`` on a labelled set, with the model in eval mode.

    ``params`` may hold buffers too: BatchNorm then normalises with those (aggregated) running statistics.
    """
    total_loss = 0.0
    correct = 0
    training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            logits = functional_call(model, params, (x[start : start + batch_size],))
            target = y[start : start + batch_size]
            total_loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(training)
    count = max(int(x.shape[0]), 1)
    return total_loss / count, correct / count
