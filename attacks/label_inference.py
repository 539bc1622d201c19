"""Label inference from the final dense layer: iDLG for one sample, bias-sign counting for batches."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.layers import final_dense, summed_gradient
from attacks.view import AttackerView, Reconstruction


def _label_counts(logit_gradient: Tensor, batch_size: int, num_samples: int) -> Tensor:
    """How many samples of each class stand behind a summed logit-bias gradient.

    Classes with a negative entry are present. When fewer classes are negative than samples, the
    remaining samples are given to present classes by the estimate ``m_c ~ -B g_c + N / C``, which
    assumes cross-entropy and near-uniform predicted probabilities.
    """
    classes = logit_gradient.shape[0]
    negative = torch.nonzero(logit_gradient < 0).flatten()
    counts = torch.zeros(classes, dtype=torch.long)
    if negative.numel() == 0:
        negative = torch.argmin(logit_gradient).reshape(1)
    if negative.numel() >= num_samples:
        order = torch.argsort(logit_gradient[negative])[:num_samples]
        counts[negative[order]] = 1
        return counts
    counts[negative] = 1
    estimate = -batch_size * logit_gradient + num_samples / classes
    for _ in range(num_samples - int(negative.numel())):
        residual = torch.full((classes,), -torch.inf, dtype=estimate.dtype)
        residual[negative] = estimate[negative] - counts[negative].to(estimate.dtype)
        counts[int(torch.argmax(residual))] += 1
    return counts


def infer_labels(view: AttackerView, attack: str = "label-inference") -> Tensor:
    """The ``num_samples`` labels behind the update, sorted, inferred from the final layer's gradient.

    One sample: the class whose bias gradient is negative (iDLG). Several: bias-sign counting; repeated
    labels are only estimated (see ``_label_counts``).
    """
    layer = final_dense(view.model, view.num_classes, attack)
    gradient = summed_gradient(view, layer.bias_key)
    if view.num_samples == 1:
        return torch.argmin(gradient).reshape(1)
    counts = _label_counts(gradient, view.batch_size, view.num_samples)
    return torch.repeat_interleave(torch.arange(view.num_classes), counts)


class LabelInference(Attack):
    """Recovers labels only (no images): iDLG for one sample, bias-sign counting for batches."""

    name: ClassVar[str] = "label-inference"

    def check(self, view: AttackerView) -> None:
        """The model must end in a dense layer with a bias producing the logits."""
        final_dense(view.model, view.num_classes, self.name)

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        labels = infer_labels(view, self.name)
        layer = final_dense(view.model, view.num_classes, self.name)
        negative = int((summed_gradient(view, layer.bias_key) < 0).sum())
        return Reconstruction(
            images=torch.zeros((0, *view.input_shape), dtype=torch.float32),
            labels=labels,
            diagnostics={
                "negative_entries": float(negative),
                "distinct_labels": float(labels.unique().numel()),
            },
        )
