"""Per-sample training losses a client can use; each works under ``torch.func.vmap`` and ``grad``."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from defenses.errors import ParameterError
from defenses.parts import Part
from defenses.registry import Registry


class Loss(Part, abc.ABC):
    """A classification loss evaluated per sample.

    Implementations use pure tensor operations (no ``.item()``, no data-dependent Python branches,
    no in-place edits of the inputs) so the engine can vectorise them over clients.
    """

    @abc.abstractmethod
    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Loss of each sample: logits (B, C) float and targets (B,) int64 give a (B,) tensor."""


LOSSES: Registry[Loss] = Registry("loss", Loss)


def one_hot(targets: Tensor, logits: Tensor) -> Tensor:
    """One-hot rows (B, C) in the dtype and device of ``logits`` (written to work under vmap)."""
    classes = torch.arange(logits.shape[-1], device=logits.device)
    return (targets.unsqueeze(-1) == classes).to(logits.dtype)


def _picked(values: Tensor, targets: Tensor) -> Tensor:
    """The entry of each row of ``values`` at its target column."""
    return values.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@LOSSES.add
@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy, ``-log p_y``; its logit gradient is ``p - onehot(y)``."""

    name: ClassVar[str] = "cross-entropy"

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Negative log-probability of the target class."""
        return -_picked(torch.log_softmax(logits, dim=-1), targets)


@LOSSES.add
@dataclass(frozen=True)
class MeanSquaredError(Loss):
    """Squared error of the softmax probabilities against the one-hot target, averaged over classes."""

    name: ClassVar[str] = "mse"

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``mean_c (softmax(z)_c - onehot(y)_c)^2``."""
        return (torch.softmax(logits, dim=-1) - one_hot(targets, logits)).pow(2).mean(dim=-1)


@LOSSES.add
@dataclass(frozen=True)
class LabelSmoothing(Loss):
    """Cross-entropy against the target ``(1 - epsilon) onehot(y) + epsilon / C`` (Szegedy et al. 2016)."""

    name: ClassVar[str] = "label-smoothing"
    main_parameter: ClassVar[str | None] = "epsilon"

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ParameterError("epsilon", "a number in [0, 1]", self.epsilon)

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy with the smoothed target."""
        log_p = torch.log_softmax(logits, dim=-1)
        return -(1.0 - self.epsilon) * _picked(log_p, targets) - self.epsilon * log_p.mean(dim=-1)


@LOSSES.add
@dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(Loss):
    """One-vs-rest binary cross-entropy on per-class sigmoids, summed over classes.

    Its logit gradient is ``sigmoid(z) - onehot(y)``: near initialisation every class entry has
    magnitude about 1/2, so each sample weighs equally on every output row (see docs/defences.md).
    """

    name: ClassVar[str] = "sigmoid-bce"

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``sum_c BCE(sigmoid(z_c), onehot(y)_c)``."""
        return F.binary_cross_entropy_with_logits(logits, one_hot(targets, logits), reduction="none").sum(-1)
