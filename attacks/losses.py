"""The client losses an optimisation attack re-creates, written for soft (probability) targets.

Names follow what a client declares in its view: "cross-entropy", "label-smoothing" (cross-entropy
against targets smoothed by 0.1, as ``torch.nn.CrossEntropyLoss(label_smoothing=0.1)``) and "mse"
(mean squared error between softmax probabilities and the one-hot targets, averaged over batch and
classes, as ``torch.nn.functional.mse_loss``) and "sigmoid-bce" (one-vs-rest binary cross-entropy on
per-class sigmoids, summed over classes). Each returns the batch-mean loss; they match the client
losses of ``defenses`` (label smoothing at its default epsilon).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LABEL_SMOOTHING = 0.1

SoftTargetLoss = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _label_smoothing(logits: Tensor, targets: Tensor) -> Tensor:
    smoothed = (1 - LABEL_SMOOTHING) * targets + LABEL_SMOOTHING / logits.shape[-1]
    return _cross_entropy(logits, smoothed)


def _softmax_mse(logits: Tensor, targets: Tensor) -> Tensor:
    return ((torch.softmax(logits, dim=-1) - targets) ** 2).mean()


def _sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    per_class = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_class.sum(dim=-1).mean()


LOSSES: dict[str, SoftTargetLoss] = {
    "cross-entropy": _cross_entropy,
    "label-smoothing": _label_smoothing,
    "mse": _softmax_mse,
    "sigmoid-bce": _sigmoid_bce,
}


def soft_target_loss(name: str) -> SoftTargetLoss | None:
    """The loss ``(logits, target probabilities) -> batch mean`` for a declared loss name, or None."""
    return LOSSES.get(name)
