"""User-written defence parts, loaded by import path in the defence tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from defenses import Loss, UpdateTransform


@dataclass(frozen=True)
class MyTransform(UpdateTransform):
    """Multiplies every client's update by ``factor``; named by its import path (no ``name`` set)."""

    main_parameter: ClassVar[str | None] = "factor"

    factor: float = 2.0

    def apply(self, update: dict[str, Tensor], generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        """Scale each tensor by ``factor``."""
        return {key: value * self.factor for key, value in update.items()}


class HingeLoss(Loss):
    """Multi-class margin loss written as a plain class (not a dataclass), with its own name."""

    name: ClassVar[str] = "test-hinge"

    def __init__(self, margin: float = 1.0) -> None:
        self.margin = margin

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Sum over wrong classes of ``max(0, margin + z_c - z_y)``."""
        true = logits.gather(-1, targets.unsqueeze(-1))
        wrong = torch.arange(logits.shape[-1], device=logits.device) != targets.unsqueeze(-1)
        return (torch.relu(self.margin + logits - true) * wrong).sum(-1)


class NotAPart:
    """A class that is not a defence part."""
