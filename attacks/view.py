"""The records an attack receives and returns, and the errors it raises.

An attack sees an :class:`AttackerView` (what an honest-but-curious server knows about one client's
update) and answers with a :class:`Reconstruction`. The client's data never passes through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attacks.losses import ClientLoss

UPDATE_KINDS = ("gradient", "delta")


class AttackNotApplicable(Exception):
    """One-line reason an attack does not apply to a model/view."""


class AttackConfigError(ValueError):
    """Unknown attack name or bad parameter (one line, lists what is allowed)."""


@dataclass(frozen=True)
class AttackerView:
    """What an honest-but-curious server knows about ONE client's update. Never the client's data.

    ``update`` is the mean loss gradient of one batch (``kind="gradient"``, FedSGD) or the weight
    delta ``params_after - params_before`` after ``local_steps`` SGD steps (``kind="delta"``, FedAvg).
    ``loss`` is the client's training loss itself (the threat model makes the loss and its parameters public;
    a ``defenses.Loss``, or any object with ``per_sample(logits, labels)``, see ``attacks.losses``).
    ``labels`` is set only when the threat model declares the labels public. ``factors`` holds the
    weights that came as a thin SVD, key -> (L, V) with the update equal to L @ V.T (V's columns
    orthonormal; a function of the update alone); such keys are then absent from ``update``. Only attacks
    that declare ``reads_factors`` are given views with factors; the helpers of ``attacks.layers`` read both.
    ``one_pass``: the threat model says the client's local steps are one pass of a shuffling loader (random
    batching, one epoch, no step cap, no DP), so a delta whose samples do not fill whole batches had full batches
    and a short last one; otherwise only whole batches can be simulated (``attacks.simulate.step_sizes``).
    """

    model: torch.nn.Module
    global_params: dict[str, Tensor]
    update: dict[str, Tensor]
    kind: Literal["gradient", "delta"]
    batch_size: int
    num_samples: int
    local_steps: int
    lr: float
    loss: ClientLoss
    input_shape: tuple[int, ...]
    num_classes: int
    labels: Tensor | None = None
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    one_pass: bool = False  # a delta's steps are one pass of a shuffling loader (its group's public batching)

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(UPDATE_KINDS)}, got {self.kind!r}")
        for name in ("batch_size", "num_samples", "local_steps", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.kind == "delta" and not self.lr > 0:
            raise ValueError(f"lr: must be > 0 for a delta update, got {self.lr}")
        missing = sorted(set(self.global_params) - set(self.update) - set(self.factors))
        if missing:
            raise ValueError(f"update: missing parameters {', '.join(missing)}")
        if self.labels is not None and self.labels.shape[0] != self.num_samples:
            raise ValueError(f"labels: expected {self.num_samples} labels (num_samples), got {self.labels.shape[0]}")


@dataclass
class Reconstruction:
    """What an attack recovered from one update: candidate images, inferred labels and diagnostics.

    ``images`` has shape ``(k, *input_shape)`` (float32, CPU); ``k`` may differ from the number of
    samples behind the update. ``labels`` has shape ``(k,)`` or ``(num_samples,)``, or is None.
    """

    images: Tensor
    labels: Tensor | None
    diagnostics: dict[str, float] = field(default_factory=dict)
