"""FedSGD for dense networks without materialising per-client gradients.

For a dense layer z = W a + b, client c's gradient is G_c = (1/n_c) sum_b d_b a_b^T with d_b the
per-sample error signal. The chunk's weighted sum sum_c n_c G_c is the gradient of the summed loss of
all the chunk's samples (one batched backward pass), and each client's norm follows from Gram matrices:
||G_c||_F^2 = (1/n_c^2) sum_{b,b'} (d_b . d_b') (a_b . a_b'). Per-client gradients, the memory traffic
that dominates the vectorised path, are never formed. Valid when the model is dense layers and
parameter-free elementwise activations, and when nothing needs each client's gradient (no update
transforms, no injected faults); the caller checks that with ``fusable``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from defenses import Loss
from testbed.local_update import StackedBatches
from testbed.records import Params

LAYERS = (nn.Linear, nn.Flatten, nn.ReLU, nn.Sigmoid, nn.Tanh)


def fusable(model: nn.Module) -> bool:
    """Whether every layer of ``model`` is dense or a parameter-free elementwise map."""
    children = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    return all(isinstance(layer, LAYERS) for layer in children)


def fused_gradients(model: nn.Module, loss: Loss, params: Params, batches: StackedBatches) -> tuple[Params, Tensor]:
    """(sum over clients of n_c times its gradient, each client's gradient norm) for one FedSGD batch each."""
    clients, width = int(batches.x.shape[0]), int(batches.x.shape[2])
    x = batches.x[:, 0].reshape(clients * width, *batches.x.shape[3:])
    y = batches.y[:, 0].reshape(-1)
    w = batches.w[:, 0].reshape(-1)
    inputs: dict[str, Tensor] = {}
    signals: dict[str, Tensor] = {}
    handles: list[Any] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(_capture(name, inputs, signals)))
    try:
        leaves = {key: value.detach().requires_grad_(True) for key, value in params.items()}
        logits = functional_call(model, leaves, (x,))
        total = (loss.per_sample(logits, y) * w).sum()
        grads = torch.autograd.grad(total, list(leaves.values()))
    finally:
        for handle in handles:
            handle.remove()
    counts = batches.w[:, 0].sum(dim=1).clamp_min(1.0)
    squares = torch.zeros(clients, dtype=x.dtype, device=x.device)
    for name, a in inputs.items():
        d = signals[name].reshape(clients, width, -1)
        a = a.detach().reshape(clients, width, -1)
        squares += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
        squares += d.sum(dim=1).pow(2).sum(dim=1)
    norms = squares.clamp_min(0.0).sqrt() / counts
    return {key: grad.detach() for key, grad in zip(leaves, grads, strict=True)}, norms


def _capture(name: str, inputs: dict[str, Tensor], signals: dict[str, Tensor]) -> Any:
    """A forward hook keeping a dense layer's input and, through a tensor hook, its output's gradient."""

    def hook(_: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        inputs[name] = args[0]

        def keep(grad: Tensor) -> None:
            signals[name] = grad.detach()

        output.register_hook(keep)

    return hook
