"""Per-round checkpoints of a run, written atomically and read back without unpickling code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from testbed.errors import UserError

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
