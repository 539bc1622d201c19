"""A client group's defence policy, and building it from the YAML ``defence`` block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from defenses.batching import BATCHINGS, Batching, RandomBatching
from defenses.dp import DPSGD, build_dp
from defenses.errors import DefenceConfigError
from defenses.losses import LOSSES, CrossEntropy, Loss
from defenses.spec import build_part
from defenses.transforms import TRANSFORMS, UpdateTransform

SPEC_KEYS = ("batching", "loss", "update", "dp")


@dataclass(frozen=True)
class DefencePolicy:
    """How a client batches its data, which loss it trains with, and how it transforms its update.

    With ``dp`` set the client trains by DP-SGD: Poisson-sampled batches replace ``batching``, and the
    transforms run on the privatised update.
    """

    batching: Batching = field(default_factory=RandomBatching)
    loss: Loss = field(default_factory=CrossEntropy)
    transforms: tuple[UpdateTransform, ...] = ()
    dp: DPSGD | None = None

    def transform(
        self, update: dict[str, Tensor], generators: Sequence[torch.Generator]
    ) -> dict[str, Tensor]:
        """Apply the update transforms in order to a stack of client updates (leading client dimension)."""
        result = dict(update)
        for step in self.transforms:
            result = step.apply(result, generators)
        return result

    def describe(self) -> dict[str, Any]:
        """Plain data naming every part and its parameters, for logging (``dp`` only when DP-SGD is on)."""
        described: dict[str, Any] = {
            "batching": self.batching.describe(),
            "loss": self.loss.describe(),
            "update": [step.describe() for step in self.transforms],
        }
        if self.dp is not None:
            described["dp"] = self.dp.describe()
        return described


def build_policy(spec: Mapping[str, Any] | None, field: str = "defence") -> DefencePolicy:
    """Build a policy from a ``defence`` block (missing keys: random, cross-entropy, no transforms, no DP-SGD).

    Raises :class:`DefenceConfigError` naming the offending path under ``field``.
    """
    if spec is None:
        return DefencePolicy()
    if not isinstance(spec, Mapping):
        raise DefenceConfigError(
            f"{field}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {spec!r}"
        )
    for key in spec:
        if key not in SPEC_KEYS:
            raise DefenceConfigError(f"{field}.{key}: unknown key; allowed: {', '.join(SPEC_KEYS)}")
    batching_spec = spec.get("batching")
    loss_spec = spec.get("loss")
    batching = build_part(
        BATCHINGS, "random" if batching_spec is None else batching_spec, f"{field}.batching"
    )
    loss = build_part(LOSSES, "cross-entropy" if loss_spec is None else loss_spec, f"{field}.loss")
    dp = build_dp(spec.get("dp"), f"{field}.dp")
    if dp is not None and batching_spec is not None:
        raise DefenceConfigError(
            f"{field}.batching: not allowed with dp, whose batches are drawn by Poisson sampling; remove it"
        )
    return DefencePolicy(batching, loss, _build_transforms(spec.get("update"), f"{field}.update"), dp)


def _build_transforms(spec: Any, field: str) -> tuple[UpdateTransform, ...]:
    """The update transforms of a ``defence.update`` list, in order."""
    if spec is None:
        return ()
    if isinstance(spec, str | Mapping) or not isinstance(spec, Sequence):
        raise DefenceConfigError(f"{field}: expected a list of transforms, got {spec!r}")
    return tuple(build_part(TRANSFORMS, item, f"{field}[{index}]") for index, item in enumerate(spec))
