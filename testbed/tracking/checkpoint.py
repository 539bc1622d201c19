"""Per-round checkpoints of a run, written atomically and read back without unpickling code."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from testbed.errors import UserError

if TYPE_CHECKING:
    from testbed.config.schema import Experiment

FILE_NAME = "state.pt"


def checkpoint_path(folder: str | Path, run_id: str) -> Path:
    """Where the checkpoint of a run lives."""
    return Path(folder) / run_id / FILE_NAME


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain data only)."""
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (is the run id right, and the checkpoints folder?)")
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state


def experiment_from_checkpoint(folder: str | Path, run_id: str, overrides: Sequence[str] = ()) -> Experiment:
    """The configuration a checkpointed run was started with (``--set`` may still change ``rounds``)."""
    from testbed.config.topology import apply_overrides, validate

    state = load_checkpoint(checkpoint_path(folder, run_id))
    data = apply_overrides(dict(state["config"]), overrides)
    return validate(data, source=f"checkpoint of run {run_id}")
