"""The logit gradients of the client losses and their derivatives, in closed form and batched.

For a batch-mean loss ``L = (1/N) sum_n l(z_n, t_n)`` over logits ``Z`` (N x C) and targets ``T`` (N x C),
``logit_derivatives`` returns ``E = dL/dZ`` (N x C) and each sample's ``K_n = de_n/dz_n`` (N x C x C).
The formulas are those of the losses in ``attacks.losses`` (checked against autograd by the tests):

- cross-entropy: ``e = (p - t) / N`` with ``p = softmax(z)``; ``K = (diag(p) - p p^T) / N``.
- label-smoothing: cross-entropy against ``(1 - eps) t + eps / C``.
- mse on softmax outputs (mean over classes): ``e = (2 / (N C)) S (p - t)`` with ``S = diag(p) - p p^T``;
  ``K = (2 / (N C)) [(diag(v) - (p.v) I - p v^T) S + S S]`` with ``v = p - t``.
- sigmoid-bce (summed over classes): ``e = (s - t) / N`` with ``s = sigmoid(z)``; ``K = diag(s (1 - s)) / N``.

Every tensor may carry leading batch dimensions (restarts, problems).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attacks.losses import LABEL_SMOOTHING

Derivatives = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _softmax_jacobian(probabilities: Tensor) -> Tensor:
    return torch.diag_embed(probabilities) - probabilities[..., :, None] * probabilities[..., None, :]


def _cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    count = logits.shape[-2]
    probabilities = torch.softmax(logits, dim=-1)
    return (probabilities - targets) / count, _softmax_jacobian(probabilities) / count


def _label_smoothing(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    smoothed = (1 - LABEL_SMOOTHING) * targets + LABEL_SMOOTHING / logits.shape[-1]
    return _cross_entropy(logits, smoothed)


def _softmax_mse(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    count, classes = logits.shape[-2], logits.shape[-1]
    scale = 2.0 / (count * classes)
    probabilities = torch.softmax(logits, dim=-1)
    jacobian = _softmax_jacobian(probabilities)
    misfit = probabilities - targets
    error = scale * (jacobian @ misfit[..., None])[..., 0]
    overlap = (probabilities * misfit).sum(dim=-1)[..., None, None]
    eye = torch.eye(classes, dtype=logits.dtype)
    outer = probabilities[..., :, None] * misfit[..., None, :]
    curvature = scale * ((torch.diag_embed(misfit) - overlap * eye - outer) @ jacobian + jacobian @ jacobian)
    return error, curvature


def _sigmoid_bce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    count = logits.shape[-2]
    sigmoids = torch.sigmoid(logits)
    return (sigmoids - targets) / count, torch.diag_embed(sigmoids * (1 - sigmoids)) / count


DERIVATIVES: dict[str, Derivatives] = {
    "cross-entropy": _cross_entropy,
    "label-smoothing": _label_smoothing,
    "mse": _softmax_mse,
    "sigmoid-bce": _sigmoid_bce,
}


def logit_derivatives(loss: str, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``E = dL/dZ`` (..., N, C) and ``K_n = de_n/dz_n`` (..., N, C, C) of the batch-mean ``loss``."""
    return DERIVATIVES[loss](logits, targets)
