"""A client group's defence policy, and building it from the YAML ``defence`` block.

Parts named by import path are imported by the model's search rule (``defenses.import_path``): from the
block's ``path`` (recorded on loading: the topology file's folder or the working directory, whichever
holds the module), then the working directory, then PYTHONPATH.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from defenses.batching import BATCHINGS, Batching, RandomBatching
from defenses.dp import DPSGD, build_dp
from defenses.errors import DefenceConfigError
from defenses.import_path import recorded_folder
from defenses.losses import LOSSES, CrossEntropy, Loss
from defenses.registry import colon_form, is_import_path
from defenses.spec import build_part, parse_part
from defenses.transforms import TRANSFORMS, UpdateTransform

SPEC_KEYS = ("batching", "loss", "update", "dp", "path")


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
    folder = spec.get("path")
    if folder is not None and not (isinstance(folder, str) and folder.strip()):
        raise DefenceConfigError(f"{field}.path: expected the folder of the import-path parts, got {folder!r}")
    batching_spec = spec.get("batching")
    loss_spec = spec.get("loss")
    batching = build_part(
        BATCHINGS, "random" if batching_spec is None else batching_spec, f"{field}.batching", folder
    )
    loss = build_part(LOSSES, "cross-entropy" if loss_spec is None else loss_spec, f"{field}.loss", folder)
    dp = build_dp(spec.get("dp"), f"{field}.dp")
    if dp is not None and batching_spec is not None:
        raise DefenceConfigError(
            f"{field}.batching: not allowed with dp, whose batches are drawn by Poisson sampling; remove it"
        )
    return DefencePolicy(batching, loss, _build_transforms(spec.get("update"), f"{field}.update", folder), dp)


def _build_transforms(spec: Any, field: str, folder: str | None) -> tuple[UpdateTransform, ...]:
    """The update transforms of a ``defence.update`` list, in order."""
    if spec is None:
        return ()
    if isinstance(spec, str | Mapping) or not isinstance(spec, Sequence):
        raise DefenceConfigError(f"{field}: expected a list of transforms, got {spec!r}")
    return tuple(build_part(TRANSFORMS, item, f"{field}[{index}]", folder) for index, item in enumerate(spec))


def import_paths(spec: Mapping[str, Any] | None) -> list[str]:
    """The import paths (``package.module:Class``) of the parts a ``defence`` block names, in order.

    Parts that cannot be read are skipped: ``build_policy`` reports them.
    """
    if not isinstance(spec, Mapping):
        return []
    update = spec.get("update")
    parts = [spec.get("batching"), spec.get("loss")]
    if isinstance(update, Sequence) and not isinstance(update, str | Mapping):
        parts.extend(update)
    found: list[str] = []
    for part in parts:
        try:
            name = parse_part(part, "defence", "part").name
        except DefenceConfigError:
            continue
        if is_import_path(name) and colon_form(name) not in found:
            found.append(colon_form(name))
    return found


def record_path(spec: dict[str, Any], base: str | Path | None) -> dict[str, Any]:
    """The ``defence`` block with ``path`` recorded where its import-path parts are imported from.

    As for a model (``defenses.import_path.recorded_folder``): a given ``path`` made absolute (relative to
    ``base``, the topology file's folder), else the first of ``base`` and the working directory that holds
    a part's module. A block without import-path parts, or whose modules are in neither, is returned as is.
    """
    if not isinstance(spec, Mapping):
        return spec
    names = import_paths(spec)
    given = spec.get("path")
    if not names or (given is not None and not isinstance(given, str)):
        return spec
    folder = recorded_folder(names, given, base)
    return spec if folder is None else {**spec, "path": folder}
