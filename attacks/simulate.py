"""Re-creating a client's update from dummy data, differentiably, and the distances to the real one.

``simulated_update`` returns what the client would have sent for dummy inputs and soft targets: the
batch-mean gradient, or the weight delta after unrolling the declared local SGD steps. It takes the
differentiation rule as an argument so the same code runs under plain autograd (one victim) and
under ``torch.func`` transforms (many victims through ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attacks.losses import SoftTargetLoss

Params = dict[str, Tensor]
Differentiate = Callable[[Callable[[Params], Tensor], Params], Params]


def autograd_gradient(function: Callable[[Params], Tensor], params: Params) -> Params:
    """The gradient of ``function`` at ``params`` by ``torch.autograd``, keeping the graph."""
    value = function(params)
    grads = torch.autograd.grad(value, list(params.values()), create_graph=True)
    return dict(zip(params, grads, strict=True))


def func_gradient(function: Callable[[Params], Tensor], params: Params) -> Params:
    """The gradient of ``function`` at ``params`` by ``torch.func.grad`` (composes with vmap)."""
    result: Params = torch.func.grad(function)(params)
    return result


def simulated_update(
    model: nn.Module,
    loss: SoftTargetLoss,
    params: Params,
    images: Tensor,
    targets: Tensor,
    *,
    kind: str,
    local_steps: int,
    lr: float,
    differentiate: Differentiate,
) -> Params:
    """The update a client would send for ``images`` (N, ...) with soft ``targets`` (N, classes).

    ``kind="gradient"``: the mean loss gradient over all N samples. ``kind="delta"``: ``local_steps``
    SGD steps of size ``lr``, step t on samples ``[t*N/steps, (t+1)*N/steps)``; returns after - before.
    """

    def batch_loss(images_part: Tensor, targets_part: Tensor) -> Callable[[Params], Tensor]:
        def value(current: Params) -> Tensor:
            return loss(functional_call(model, current, (images_part,)), targets_part)

        return value

    if kind == "gradient":
        return differentiate(batch_loss(images, targets), params)
    per_step = images.shape[0] // local_steps
    current = params
    for step in range(local_steps):
        part = slice(step * per_step, (step + 1) * per_step)
        grads = differentiate(batch_loss(images[part], targets[part]), current)
        current = {name: current[name] - lr * grads[name] for name in current}
    return {name: current[name] - params[name] for name in params}


def squared_distance(simulated: Params, target: Params) -> Tensor:
    """Sum over parameters of the squared L2 distance (the DLG objective)."""
    return torch.stack([((simulated[name] - target[name]) ** 2).sum() for name in target]).sum()


def cosine_distance(simulated: Params, target: Params) -> Tensor:
    """1 - cosine similarity of the two updates, all parameters concatenated (Inverting Gradients).

    Computed as half the squared distance of the unit vectors, which keeps its precision when the
    updates are nearly parallel (1 - cos of 1e-7 and below are common on small sigmoid networks).
    """
    simulated_norm = torch.stack([(simulated[name] ** 2).sum() for name in target]).sum().sqrt()
    target_norm = torch.stack([(target[name] ** 2).sum() for name in target]).sum().sqrt()
    simulated_scale = 1 / simulated_norm.clamp_min(1e-30)
    target_scale = 1 / target_norm.clamp_min(1e-30)
    terms = [(simulated[name] * simulated_scale - target[name] * target_scale) ** 2 for name in target]
    return 0.5 * torch.stack([term.sum() for term in terms]).sum()


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between vertically and horizontally adjacent pixels."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return vertical + horizontal
