"""Server-side aggregation: the weighted mean of client updates and the server step.

Chunk payloads arrive as weighted sums; adding them in chunk-index order makes the result independent
of how many workers produced them. ``Aggregator`` is the Ray actor that holds this logic at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from testbed.config import AlgorithmConfig
from testbed.records import ChunkPayload, ClientUpdate, Params


@dataclass
class Aggregate:
    """The sum of weighted updates and the total weight behind it."""

    weighted_sum: Params | None = None
    weight: float = 0.0
    audited: list[ClientUpdate] = field(default_factory=list)

    def add(self, payload: ChunkPayload) -> None:
        """Add one chunk's payload (callers add chunks in index order)."""
        self.audited.extend(payload.audited)
        if payload.weighted_sum is None:
            return
        if self.weighted_sum is None:
            self.weighted_sum = {key: value.clone() for key, value in payload.weighted_sum.items()}
        else:
            for key, value in payload.weighted_sum.items():
                self.weighted_sum[key] += value
        self.weight += payload.weight

    def mean(self) -> Params | None:
        """The weighted mean update, or None when no update was accepted."""
        if self.weighted_sum is None or self.weight <= 0:
            return None
        return {key: value / self.weight for key, value in self.weighted_sum.items()}


def combine(payloads: Sequence[ChunkPayload]) -> Aggregate:
    """Sum chunk payloads in index order."""
    total = Aggregate()
    for payload in sorted(payloads, key=lambda item: item.index):
        total.add(payload)
    return total


def server_step(params: Params, mean_update: Params, algorithm: AlgorithmConfig) -> Params:
    """Apply the mean update: gradients are descended (lr x server_lr), deltas added (server_lr)."""
    if algorithm.name == "fedsgd":
        step = -algorithm.lr * algorithm.server_lr
    else:
        step = algorithm.server_lr
    with torch.no_grad():
        return {key: params[key] + step * mean_update[key] for key in params}


class Aggregator:
    """The (honest-but-curious) aggregator actor: combines the round's payloads into new parameters.

    When it has attack actors, it hands the audited raw updates to them and returns the references
    of their outcomes at once, so audits never hold up aggregation.
    """

    def __init__(self, algorithm: AlgorithmConfig, attack_workers: Sequence[Any] = (), name: str = "root") -> None:
        torch.set_num_threads(1)
        self.algorithm = algorithm
        self.attack_workers = list(attack_workers)
        self.name = name
        self._next = 0

    def aggregate(self, params: Params, *payloads: ChunkPayload) -> tuple[Params, float, list[Any]]:
        """New global parameters, the total weight, and references to pending audit outcomes."""
        total = combine(payloads)
        mean = total.mean()
        new_params = params if mean is None else server_step(params, mean, self.algorithm)
        return new_params, total.weight, self._audit(params, total.audited)

    def _audit(self, params: Params, updates: list[ClientUpdate]) -> list[Any]:
        if not updates or not self.attack_workers:
            return []
        count = len(self.attack_workers)
        shares = [updates[start::count] for start in range(count)]
        refs = []
        for share in shares:
            if share:
                worker = self.attack_workers[self._next % count]
                self._next += 1
                refs.append(worker.audit.remote(params, share))
        return refs
