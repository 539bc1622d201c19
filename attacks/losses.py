"""The client's training loss as the attacks use it: the very loss object the client trained with.

The threat model says the server knows the training loss and its parameters. The engine therefore puts
the client's declared loss (a ``defenses.Loss``: registered or loaded by import path, with its parameters)
into the attacker's view, and every attack derives what it needs from that one object, so a loss exists
once, in ``defenses``; ``attacks`` never imports ``defenses`` and only relies on the ``ClientLoss``
protocol below. From it come:

- ``batch_loss``: the batch-mean loss against target *probabilities*, the expectation over classes
  ``sum_c t_c l(z, c)`` (exact for one-hot targets; what the optimisation attacks and DLG's soft labels use);
- ``logit_derivatives``: the logit gradient ``E = dL/dZ`` and each sample's curvature ``de_n/dz_n`` (what
  ce-demix's solve needs): the loss's own closed form where it states one (the built-in losses do, beside
  their definitions), else automatic differentiation;
- ``centred`` and ``marks_presence``: two properties of the loss probed numerically (does a sample's logit
  gradient sum to zero over the classes; is it never negative off the target class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

SoftTargetLoss = Callable[[Tensor, Tensor], Tensor]
"""``(logits (..., C), target probabilities (..., C)) -> batch-mean loss`` (a scalar)."""


@runtime_checkable
class ClientLoss(Protocol):
    """A per-sample classification loss: ``per_sample(logits (B, C), labels (B,) int64) -> (B,)``.

    ``defenses.Loss`` satisfies it. It must be written with tensor operations only (it is differentiated
    twice and vectorised). Its ``name`` attribute, when it has one, names it in messages.
    """

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss of each sample."""
        ...


def loss_name(loss: ClientLoss) -> str:
    """The loss's name for messages (its registry name or import path)."""
    return str(getattr(loss, "name", type(loss).__name__))


def loss_key(loss: ClientLoss) -> tuple[str, str]:
    """Equal for two loss objects that compute the same function (type and parameters): for grouping views."""
    return (f"{type(loss).__module__}:{type(loss).__qualname__}", repr(loss))


def _per_class(loss: ClientLoss, logits: Tensor) -> Tensor:
    """``l(z_m, c)`` for every row ``z_m`` of ``logits`` (M, C) and every class ``c``: (M, C)."""
    rows, classes = logits.shape
    tiled = logits.unsqueeze(0).expand(classes, rows, classes).reshape(classes * rows, classes)
    labels = torch.arange(classes, device=logits.device).repeat_interleave(rows)
    return loss.per_sample(tiled, labels).reshape(classes, rows).transpose(0, 1)


def batch_loss(loss: ClientLoss) -> SoftTargetLoss:
    """The batch-mean loss against target probabilities: the mean over samples of ``sum_c t_c l(z, c)``."""

    def mean_loss(logits: Tensor, targets: Tensor) -> Tensor:
        classes = logits.shape[-1]
        per_class = _per_class(loss, logits.reshape(-1, classes))
        return (targets.reshape(-1, classes) * per_class).sum(dim=-1).mean()

    return mean_loss


def _sample_losses(loss: ClientLoss, logits: Tensor, targets: Tensor) -> Tensor:
    """Each row's loss (M,) against its target probabilities (M, C): one call of ``per_sample`` with the labels
    when every target is one-hot, else the expectation over classes."""
    hard = bool(((targets == 0) | (targets == 1)).all() and (targets.sum(dim=-1) == 1).all())
    if hard:
        return loss.per_sample(logits, targets.argmax(dim=-1))
    return (targets * _per_class(loss, logits)).sum(dim=-1)


def logit_derivatives(loss: ClientLoss, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``E = dL/dZ`` (..., N, C) and ``K_n = de_n/dz_n`` (..., N, C, C) of the batch-mean loss.

    ``logits`` and ``targets`` (probabilities, one-hot for hard labels) are (..., N, C); the batch mean runs
    over the N axis. A loss that states its own derivatives (``logit_derivatives(logits, targets)`` per
    sample, as the built-in losses of ``defenses`` do beside their definition) is asked for them; any other
    is differentiated automatically (``autograd_logit_derivatives``). Tests check both ways agree.
    """
    stated = getattr(loss, "logit_derivatives", None)
    if callable(stated):
        count, classes = logits.shape[-2], logits.shape[-1]
        flat = targets.to(logits.dtype).expand(logits.shape).reshape(-1, classes)
        error, curvature = stated(logits.reshape(-1, classes), flat)
        return (error / count).reshape(logits.shape), (curvature / count).reshape(*logits.shape, classes)
    return autograd_logit_derivatives(loss, logits, targets)


def autograd_logit_derivatives(loss: ClientLoss, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``logit_derivatives`` by automatic differentiation of ``loss.per_sample``: a sample's loss depends on its
    own logits only, so one backward pass gives every row of ``E`` and ``C`` more (one per class) every ``K_n``."""
    count, classes = logits.shape[-2], logits.shape[-1]
    flat_targets = targets.to(logits.dtype).expand(logits.shape).reshape(-1, classes).detach()
    with torch.enable_grad():
        flat_logits = logits.detach().reshape(-1, classes).requires_grad_(True)
        total = _sample_losses(loss, flat_logits, flat_targets).sum()
        (error,) = torch.autograd.grad(total, flat_logits, create_graph=True)
        if error.requires_grad:
            rows = [
                torch.autograd.grad(
                    error[:, c].sum(), flat_logits, retain_graph=c < classes - 1, materialize_grads=True
                )[0]
                for c in range(classes)
            ]
            curvature = torch.stack(rows, dim=-2)
        else:  # a loss linear in the logits
            curvature = flat_logits.new_zeros(len(flat_logits), classes, classes)
    return (
        (error.detach() / count).reshape(logits.shape),
        (curvature / count).reshape(*logits.shape, classes),
    )


def _probe(classes: int) -> tuple[Tensor, Tensor]:
    """Logits (float64) at which the loss's properties are probed: zero, moderate and saturated rows, each
    paired with every class as the target."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.cat(
        [
            torch.zeros(1, classes, dtype=torch.float64),
            torch.randn(24, classes, generator=generator, dtype=torch.float64),
            8 * torch.randn(24, classes, generator=generator, dtype=torch.float64),
        ]
    )
    logits = rows.repeat_interleave(classes, dim=0)
    targets = torch.eye(classes, dtype=torch.float64).repeat(len(rows), 1)
    return logits, targets


_PROPERTIES: dict[tuple[object, ...], bool] = {}


def _cached(kind: str, loss: ClientLoss, num_classes: int, probe: Callable[[ClientLoss, int], bool]) -> bool:
    key = (kind, loss_key(loss), num_classes)
    if key not in _PROPERTIES:
        _PROPERTIES[key] = probe(loss, num_classes)
    return _PROPERTIES[key]


def centred(loss: ClientLoss, num_classes: int) -> bool:
    """Whether every sample's logit gradient sums to zero over the classes (softmax losses: then at most
    ``C - 1`` samples can be de-mixed), probed at zero, random and saturated logits to 1e-9 (cached per loss)."""
    return _cached("centred", loss, num_classes, _centred)


def marks_presence(loss: ClientLoss, num_classes: int) -> bool:
    """Whether a sample's logit gradient is never negative off its target class, so that a negative entry of
    a batch's bias gradient proves its class present (cross-entropy, sigmoid-bce; not label smoothing, whose
    smoothed targets make off-class entries negative). Probed as ``centred`` (cached per loss)."""
    return _cached("presence", loss, num_classes, _marks_presence)


def _centred(loss: ClientLoss, num_classes: int) -> bool:
    logits, targets = _probe(num_classes)
    error, _ = logit_derivatives(loss, logits.unsqueeze(1), targets.unsqueeze(1))
    scale = error.abs().amax(dim=-1).clamp_min(1e-300)
    return bool((error.sum(dim=-1).abs() <= 1e-9 * scale).all())


def _marks_presence(loss: ClientLoss, num_classes: int) -> bool:
    logits, targets = _probe(num_classes)
    error, _ = logit_derivatives(loss, logits.unsqueeze(1), targets.unsqueeze(1))
    off_target = error[:, 0][targets == 0]
    return bool((off_target >= -1e-12).all())
