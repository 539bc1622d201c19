"""Records passed between the stages of a round: tasks to workers, their results, client updates."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

Params = dict[str, Tensor]

REJECT_REASONS = ("non_finite", "shape", "dtype", "norm")


@dataclass(frozen=True)
class ChunkTask:
    """A fixed slice of one group's sampled clients for one round; chunks are summed in ``index`` order."""

    index: int
    round: int
    group: int
    clients: np.ndarray  # sorted global client ids
    audited: np.ndarray  # the subset whose raw updates travel to the auditing aggregator


@dataclass
class ClientUpdate:
    """One client's raw update as the aggregator receives it (no ground truth: that stays with the simulator)."""

    client: int
    group: str
    round: int
    update: Params  # gradient (FedSGD) or weight delta (FedAvg), keys = model parameter names
    num_samples: int
    batch_size: int
    local_steps: int
    labels: np.ndarray | None  # the batch labels, only when the threat model declares them public
    # weights sent as a thin SVD (testbed.runtime.low_rank): key -> (L, V), the update being L @ V.T;
    # such a key is not in ``update`` (``formed`` gives every parameter as a tensor)
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def formed(self) -> Params:
        """Every parameter's update as a tensor of the update's dtype (factored weights multiplied out)."""
        dtype = next(iter(self.update.values())).dtype if self.update else torch.float32
        return {**self.update, **{key: (left @ right.T).to(dtype) for key, (left, right) in self.factors.items()}}

    def __getstate__(self) -> dict[str, Any]:
        """Tensors travel as numpy arrays, which Ray's object store passes without copying them."""
        state = dict(self.__dict__)
        state["update"] = {key: value.detach().cpu().numpy() for key, value in self.update.items()}
        state["factors"] = {key: (left.numpy(), right.numpy()) for key, (left, right) in self.factors.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Arrays from the object store are read-only: the tensors alias them (readers must not write)."""
        state["update"] = _tensors(state["update"])
        factors = state.get("factors", {})
        lefts = _tensors({key: pair[0] for key, pair in factors.items()})
        rights = _tensors({key: pair[1] for key, pair in factors.items()})
        state["factors"] = {key: (lefts[key], rights[key]) for key in factors}
        self.__dict__.update(state)


@dataclass
class ChunkSummary:
    """The small, always-fetched part of a chunk's result: counts and timings."""

    index: int
    group: str
    sampled: int
    accepted: int = 0
    dropped: int = 0
    late: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    short_batches: int = 0
    weight: float = 0.0
    seconds: float = 0.0
    max_delay_s: float = 0.0
    ground_truth: dict[int, np.ndarray] = field(default_factory=dict)  # audited client -> sample indices used


@dataclass
class ChunkPayload:
    """The heavy part of a chunk's result: the weighted sum of accepted updates and audited raw updates."""

    index: int
    group: str
    weighted_sum: Params | None
    weight: float
    audited: list[ClientUpdate] = field(default_factory=list)
    buffers: Params | None = None  # models with buffers: the accepted clients' share (testbed.runtime.buffers)

    def __getstate__(self) -> dict[str, Any]:
        """The weighted sum travels as numpy arrays (no copy into or out of Ray's object store)."""
        state = dict(self.__dict__)
        for name in ("weighted_sum", "buffers"):
            if state.get(name) is not None:
                state[name] = {key: value.detach().cpu().numpy() for key, value in state[name].items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Read-only tensors over the received arrays (the aggregator copies before adding)."""
        for name in ("weighted_sum", "buffers"):
            if state.get(name) is not None:
                state[name] = _tensors(state[name])
        state.setdefault("buffers", None)
        self.__dict__.update(state)


def _tensors(arrays: dict[str, np.ndarray]) -> Params:
    """Tensors sharing the memory of (possibly read-only) received arrays."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: torch.from_numpy(value) for key, value in arrays.items()}
