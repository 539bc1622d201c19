"""Server-side aggregation: the weighted mean of client updates and the server step.

Chunk payloads arrive as weighted sums; adding them in chunk-index order makes the result independent
of how many workers produced them. A model's buffers (BatchNorm statistics) are aggregated beside the
updates by the rule of ``testbed.runtime.buffers``. ``Aggregator`` is the Ray actor that holds this logic
at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from testbed.config.schema import AlgorithmConfig
from testbed.runtime.buffers import mean_buffers, merge_buffers
from testbed.runtime.records import ChunkPayload, ClientUpdate, Params


@dataclass
class Aggregate:
    """The sum of weighted updates and the total weight behind it."""

    weighted_sum: Params | None = None
    weight: float = 0.0
    audited: list[ClientUpdate] = field(default_factory=list)
    buffers: Params | None = None

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
        if payload.buffers is not None:
            self.buffers = merge_buffers(self.buffers, payload.buffers)
        self.weight += payload.weight

    def mean(self) -> Params | None:
        """The weighted mean update, or None when no update was accepted."""
        if self.weighted_sum is None or self.weight <= 0:
            return None
        return {key: value / self.weight for key, value in self.weighted_sum.items()}

    def mean_buffers(self) -> Params:
        """The aggregated buffers of the accepted clients (none for a model without buffers)."""
        if self.buffers is None or self.weight <= 0:
            return {}
        return mean_buffers(self.buffers, self.weight)


def combine(payloads: Sequence[ChunkPayload]) -> Aggregate:
    """Sum chunk payloads in index order."""
    total = Aggregate()
    for payload in sorted(payloads, key=lambda item: item.index):
        total.add(payload)
    return total


def server_step(params: Params, mean_update: Params, algorithm: AlgorithmConfig) -> Params:
    """Apply the mean update: gradients are descended (lr x server_lr), deltas added (server_lr).

    ``params`` may hold buffers too (the global state of a model with buffers): those the update does not
    cover are kept as they are.
    """
    if algorithm.name == "fedsgd":
        step = -algorithm.lr * algorithm.server_lr
    else:
        step = algorithm.server_lr
    with torch.no_grad():
        return {key: params[key] + step * mean_update[key] if key in mean_update else params[key] for key in params}


def global_step(params: Params, payloads: Sequence[ChunkPayload], algorithm: AlgorithmConfig) -> tuple[Params, float]:
    """The new global state from a round's chunk payloads (summed in chunk order) and their total weight:
    the server step on the mean update plus the mean buffers; the old state when nothing was accepted."""
    total = combine(payloads)
    mean = total.mean()
    if mean is None:
        return params, total.weight
    return {**server_step(params, mean, algorithm), **total.mean_buffers()}, total.weight


def edge_update(total: Aggregate, edge_id: int, name: str) -> ClientUpdate | None:
    """An edge's mean update as the root sees it, for a round in which the edge had audited clients."""
    mean = total.mean()
    if mean is None or not total.audited:
        return None
    first = total.audited[0]
    return ClientUpdate(
        client=-(edge_id + 1),
        group=f"{name}-aggregate",
        round=first.round,
        update=mean,
        num_samples=max(1, int(total.weight)),
        batch_size=first.batch_size,
        local_steps=max(update.local_steps for update in total.audited),
        labels=None,
    )


class Aggregator:
    """An (honest-but-curious) aggregator actor: the root, or an edge between some groups and the root.

    The root combines what it receives into new global parameters. An edge combines its groups' chunk
    payloads into one payload for the root; when the root attacks, that payload carries the edge's mean
    update for the root's attacker to see. Attack actors are named, so a restarted aggregator finds
    them again. An aggregator with attack actors hands the raw updates it
    receives to them and returns the references of their outcomes at once, so audits never hold it up.
    """

    def __init__(
        self,
        algorithm: AlgorithmConfig,
        attack_workers: Sequence[str] = (),
        name: str = "root",
        *,
        edge_id: int = -1,
        expose_mean: bool = False,
    ) -> None:
        torch.set_num_threads(1)
        self.algorithm = algorithm
        import ray

        self.attack_workers = [ray.get_actor(name) for name in attack_workers]
        self.name = name
        self.edge_id = edge_id
        self.expose_mean = expose_mean
        self._next = 0

    def aggregate(
        self, params: Params, audited_refs: list[Any], *payloads: ChunkPayload
    ) -> tuple[Params, float, list[Any]]:
        """Root: new global parameters, the total weight, and references to pending audit outcomes.

        ``audited_refs`` name the raw client updates this aggregator received (chunk order); payloads
        carry edge aggregates inline, and client updates as metadata only.
        """
        new_params, weight = global_step(params, payloads, self.algorithm)
        audited = [update for payload in sorted(payloads, key=lambda item: item.index) for update in payload.audited]
        return new_params, weight, self._audit(params, _inline(audited), audited_refs)

    def forward(
        self, params: Params, audited_refs: list[Any], *payloads: ChunkPayload
    ) -> tuple[ChunkPayload, list[Any]]:
        """Edge: one payload for the root (its weighted sum), and references to pending audit outcomes."""
        total = combine(payloads)
        refs = self._audit(params, _inline(total.audited), audited_refs)
        exposed = edge_update(total, self.edge_id, self.name) if self.expose_mean else None
        payload = ChunkPayload(
            index=self.edge_id,
            group=self.name,
            weighted_sum=total.weighted_sum,
            weight=total.weight,
            audited=[exposed] if exposed is not None else [],
            buffers=total.buffers,
        )
        return payload, refs

    def _audit(self, params: Params, updates: list[ClientUpdate], audited_refs: list[Any]) -> list[Any]:
        """Share the received updates among the attack actors: inline ones by value (split among the actors),
        the rest by reference, one task per chunk, so that the scoring of a round's first chunks starts while
        its later ones are attacked, and a round's scoring spreads over the scorers."""
        if not (updates or audited_refs) or not self.attack_workers:
            return []
        count = len(self.attack_workers)
        tasks: list[tuple[list[ClientUpdate], list[Any]]] = [
            (share, []) for share in (updates[start::count] for start in range(count)) if share
        ]
        tasks += [([], [ref]) for ref in audited_refs]
        import ray

        shared = ray.put(params)  # stored once, not once per task
        refs: list[Any] = []
        for share, by_reference in tasks:
            worker = self.attack_workers[self._next % count]
            self._next += 1
            refs.append(worker.audit.remote(shared, share, self.name, by_reference))
        return refs


def _inline(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The updates that arrived with their tensors (edge aggregates), not as metadata of referenced ones."""
    return [update for update in updates if update.update or update.factors]
