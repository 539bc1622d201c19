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
    no in-place edits of the inputs) so the engine can vectorise them over clients. A loss may also state
    its logit derivatives in closed form (``logit_derivatives``); the attacks then use them instead of
    differentiating ``per_sample`` (the built-in losses do, and tests check both agree).
    """

    @abc.abstractmethod
    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Loss of each sample: logits (B, C) float and targets (B,) int64 give a (B,) tensor."""


LOSSES: Registry[Loss] = Registry("loss", Loss)


def one_hot(targets: Tensor, logits: Tensor) -> Tensor:
    """One-hot rows (B, C) in the dtype and device of ``logits`` (written to work under vmap)."""
    classes = torch.arange(logits.shape[-1], device=logits.device)
    return (targets.unsqueeze(-1) == classes).to(logits.dtype)


def _softmax_jacobian(probabilities: Tensor) -> Tensor:
    """``diag(p) - p p^T`` per row: the Jacobian of softmax."""
    return torch.diag_embed(probabilities) - probabilities[..., :, None] * probabilities[..., None, :]


def _cross_entropy_derivatives(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample against target probabilities ``t`` (rows summing to 1): ``e = p - t``, ``k = diag(p) - p p^T``."""
    probabilities = torch.softmax(logits, dim=-1)
    return probabilities - targets, _softmax_jacobian(probabilities)


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

    def logit_derivatives(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's logit gradient (M, C) and its Jacobian (M, C, C) against target probabilities (M, C)."""
        return _cross_entropy_derivatives(logits, targets)


@LOSSES.add
@dataclass(frozen=True)
class MeanSquaredError(Loss):
    """Squared error of the softmax probabilities against the one-hot target, averaged over classes."""

    name: ClassVar[str] = "mse"

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``mean_c (softmax(z)_c - onehot(y)_c)^2``."""
        return (torch.softmax(logits, dim=-1) - one_hot(targets, logits)).pow(2).mean(dim=-1)

    def logit_derivatives(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``e = (2/C) S (p - t)`` and ``k = (2/C) [(diag(v) - (p.v) I - p v^T) S + S S]`` with ``S`` softmax's
        Jacobian and ``v = p - t`` (the expectation over target classes has the derivatives of ``t`` plugged in)."""
        classes = logits.shape[-1]
        scale = 2.0 / classes
        probabilities = torch.softmax(logits, dim=-1)
        jacobian = _softmax_jacobian(probabilities)
        misfit = probabilities - targets
        error = scale * (jacobian @ misfit[..., None])[..., 0]
        overlap = (probabilities * misfit).sum(dim=-1)[..., None, None]
        eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
        outer = probabilities[..., :, None] * misfit[..., None, :]
        curvature = scale * ((torch.diag_embed(misfit) - overlap * eye - outer) @ jacobian + jacobian @ jacobian)
        return error, curvature


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

    def logit_derivatives(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy's derivatives against the smoothed targets ``(1 - epsilon) t + epsilon / C``."""
        return _cross_entropy_derivatives(logits, (1.0 - self.epsilon) * targets + self.epsilon / logits.shape[-1])


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

    def logit_derivatives(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``e = s - t`` and ``k = diag(s (1 - s))`` with ``s = sigmoid(z)``."""
        sigmoids = torch.sigmoid(logits)
        return sigmoids - targets, torch.diag_embed(sigmoids * (1 - sigmoids))
