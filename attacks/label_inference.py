"""Label inference from the final dense layer: iDLG for one sample, bias-corrected counting for batches.

For softmax cross-entropy the bias gradient of N samples is ``g_c = pbar_c - n_c / N`` (``pbar`` the batch's
mean prediction, ``n_c`` the class counts), so ``n_c = N (pbar_c - g_c)`` (the count estimate of Geng et al.
2021). A negative entry proves the class present, and the samples are handed out greedily, one at a time
to the class whose estimate most exceeds its count (the label-by-label loop of Wainakh et al. 2022, LLG,
with each sample's impact on its entry taken as 1/N). ``pbar_c`` of a present class is unknown; it is
estimated by the mean entry of the absent (non-negative) classes, which is ``1/C`` at initialisation and
tracks the model's off-class probability as it trains. Every count scales with the samples per step of
the update, ``num_samples / local_steps``, never the declared batch size (a client's last batch may be short).
"""

from __future__ import annotations

from itertools import combinations_with_replacement
from math import comb
from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.layers import final_dense, summed_gradient
from attacks.view import AttackerView, Reconstruction


def count_estimates(logit_gradient: Tensor, samples_per_step: float) -> Tensor:
    """``n_c ~ samples_per_step * (pbar - g_c)`` for every class, ``pbar`` the mean non-negative entry."""
    absent = logit_gradient[logit_gradient >= 0]
    off_class = absent.mean() if absent.numel() else logit_gradient.new_zeros(())
    return samples_per_step * (off_class - logit_gradient)


def label_counts(logit_gradient: Tensor, num_samples: int, local_steps: int = 1) -> Tensor:
    """How many of the ``num_samples`` samples behind a (summed over ``local_steps``) logit-bias gradient
    carry each class.

    Classes with a negative entry are present (one sample each; the ``num_samples`` most negative when
    more are negative). The remaining samples go one at a time to the present class whose estimate
    (``count_estimates``) most exceeds its count. A present class whose entry is not negative (one the
    other samples predict strongly) is missed.
    """
    classes = logit_gradient.shape[0]
    counts = torch.zeros(classes, dtype=torch.long)
    negative = torch.nonzero(logit_gradient < 0).flatten()
    if negative.numel() == 0:
        negative = torch.argmin(logit_gradient).reshape(1)
    if negative.numel() >= num_samples:
        order = torch.argsort(logit_gradient[negative])[:num_samples]
        counts[negative[order]] = 1
        return counts
    counts[negative] = 1
    estimate = count_estimates(logit_gradient, num_samples / local_steps)[negative]
    for _ in range(num_samples - int(negative.numel())):
        counts[negative[int(torch.argmax(estimate - counts[negative].to(estimate.dtype)))]] += 1
    return counts


def present_classes(logit_gradient: Tensor, num_samples: int) -> list[int]:
    """The classes a negative entry proves present (for losses whose logit gradient is prediction minus
    one-hot target, e.g. cross-entropy and sigmoid-bce): at most ``num_samples``, most negative first."""
    order = torch.argsort(logit_gradient).tolist()
    return [label for label in order if float(logit_gradient[label]) < 0][:num_samples]


def label_multisets(num_samples: int, num_classes: int, required: list[int], limit: int) -> list[Tensor] | None:
    """Every multiset of ``num_samples`` labels (sorted tensors) holding the ``required`` classes, or None
    when there are more than ``limit``."""
    free = num_samples - len(required)
    if comb(free + num_classes - 1, free) > limit:
        return None
    extras = combinations_with_replacement(range(num_classes), free)
    return [torch.tensor(sorted(required + list(extra)), dtype=torch.long) for extra in extras]


def label_neighbours(labels: Tensor, num_classes: int, required: list[int]) -> list[Tensor]:
    """The multisets one label away from ``labels`` (sorted tensors) that still hold the ``required`` classes."""
    found: dict[tuple[int, ...], None] = {}
    for position in range(labels.shape[0]):
        for label in range(num_classes):
            changed = labels.tolist()
            changed[position] = label
            if set(required) <= set(changed):
                found[tuple(sorted(changed))] = None
    found.pop(tuple(sorted(labels.tolist())), None)
    return [torch.tensor(option, dtype=torch.long) for option in found]


def infer_labels(view: AttackerView, attack: str = "label-inference") -> Tensor:
    """The ``num_samples`` labels behind the update, sorted, inferred from the final layer's bias update.

    One sample: the class whose bias gradient is negative (iDLG, Zhao et al. 2020). Several: bias-corrected
    counting of ``view.num_samples`` samples over ``view.local_steps`` steps (see ``label_counts``);
    repeated labels are estimates.
    """
    layer = final_dense(view.model, view.num_classes, attack)
    gradient = summed_gradient(view, layer.bias_key)
    if view.num_samples == 1:
        return torch.argmin(gradient).reshape(1)
    steps = view.local_steps if view.kind == "delta" else 1
    counts = label_counts(gradient, view.num_samples, steps)
    return torch.repeat_interleave(torch.arange(view.num_classes), counts)


class LabelInference(Attack):
    """Recovers labels only (no images): iDLG for one sample, bias-corrected counting for batches."""

    name: ClassVar[str] = "label-inference"
    in_auto: ClassVar[bool] = False

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
