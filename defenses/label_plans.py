"""Vectorised batch planning: shuffled passes, and batches built from a fixed number of labels.

Both planners return positions into the client's sample list, never repeat a sample inside a batch,
and shrink a batch (rather than repeat samples or break its label rule) when the client lacks samples.
"""

from __future__ import annotations

import math

import numpy as np

_UNIT = 1 << 20  # resolution of the integer arithmetic in :func:`apportion`


def plan_shuffled(size: int, batch_size: int, num_batches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches cut from successive random permutations of ``range(size)``.

    Each pass over the data is one permutation cut into ``ceil(size / batch_size)`` batches, the last of
    which holds the leftover samples; a new pass starts when a permutation is used up.
    """
    if num_batches == 0:
        return []
    if size == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_batches)]
    per_pass = math.ceil(size / batch_size)
    passes = math.ceil(num_batches / per_pass)
    perms = rng.random((passes, size)).argsort(axis=1)
    return [
        perms[i // per_pass, (i % per_pass) * batch_size : (i % per_pass + 1) * batch_size]
        for i in range(num_batches)
    ]


def apportion(weights: np.ndarray, total: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Random integer counts, one per weight, that sum to ``total`` with none above ``cap``.

    The target shares are proportional to ``weights`` with any share above ``cap`` held at ``cap`` and
    the rest shared out again (water filling). Systematic sampling in random order rounds each share to
    its floor or ceiling with the share as expectation. Requires ``total <= cap * len(weights)``.
    """
    share = _capped_shares(weights.astype(np.float64), total, cap)
    scaled = np.minimum(np.floor(share * _UNIT).astype(np.int64), cap * _UNIT)
    capped = scaled == cap * _UNIT
    deficit = int(total * _UNIT - scaled.sum())
    free = np.flatnonzero(~capped)
    if deficit > 0 and len(free):
        np.add.at(scaled, free[np.arange(deficit) % len(free)], 1)
    order = rng.permutation(len(weights))
    edges = np.concatenate(([0], np.cumsum(scaled[order]))) + int(rng.integers(_UNIT))
    counts = np.empty(len(weights), dtype=np.int64)
    counts[order] = np.diff(edges // _UNIT)
    return counts


def _capped_shares(weights: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Shares proportional to ``weights`` summing to ``total``, none above ``cap`` (water filling)."""
    share = np.zeros_like(weights)
    free = weights > 0
    remaining = float(total)
    while free.any():
        active = np.where(free, weights, 0.0)
        candidate = remaining * active / active.sum()
        over = free & (candidate > cap * (1 + 1e-12))
        if not over.any():
            share[free] = candidate[free]
            break
        share[over] = cap
        free &= ~over
        remaining -= cap * int(over.sum())
    return share


def plan_label_groups(
    labels: np.ndarray,
    batch_size: int,
    num_batches: int,
    labels_per_batch: int,
    rng: np.random.Generator,
    per_label_cap: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Batches that each draw ``labels_per_batch`` different labels; returns (batches, short mask).

    1. Every batch gets ``min(labels_per_batch, batch_size, classes present)`` different labels. How many
       batches a label joins is proportional to its sample count (at most one appearance per batch),
       rounded at random (:func:`apportion`).
    2. The batch's ``batch_size`` slots are shared as evenly as possible between its labels, at most
       ``per_label_cap`` each when given.
    3. Each label's slots are filled from a stream of random permutations of that label's samples, so
       over many batches every sample of a label is used about equally often; where a batch straddles
       two permutations the new one starts with samples not in that batch, so a batch never holds a
       sample twice.
    4. A label with fewer samples than its slots gives all it has: the batch is smaller than
       ``batch_size``. A batch is short when it is smaller than ``batch_size`` or has fewer than
       ``labels_per_batch`` labels.
    """
    if num_batches == 0:
        return [], np.zeros(0, dtype=bool)
    if len(labels) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_batches)], np.ones(num_batches, dtype=bool)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    per_batch = min(labels_per_batch, batch_size, len(counts))
    batch_labels = _deal_labels(counts, num_batches, per_batch, rng)
    base, extra = divmod(batch_size, per_batch)
    slots = base + (rng.random(batch_labels.shape).argsort(axis=1) < extra)
    if per_label_cap is not None:
        slots = np.minimum(slots, per_label_cap)
    take = np.minimum(slots, counts[batch_labels]).ravel()
    label_of = batch_labels.ravel()
    batch_of = np.repeat(np.arange(num_batches), per_batch)
    positions = _fill_from_label_streams(inverse, counts, label_of, take, rng)
    owner = np.repeat(batch_of, take)
    order = np.lexsort((rng.random(len(positions)), owner))
    sizes = np.bincount(owner, minlength=num_batches)
    batches = np.split(positions[order], np.cumsum(sizes)[:-1])
    short = (sizes < batch_size) | (per_batch < labels_per_batch)
    return batches, short


def _deal_labels(
    counts: np.ndarray, num_batches: int, per_batch: int, rng: np.random.Generator
) -> np.ndarray:
    """(num_batches, per_batch) label ids, all different within a row, frequency proportional to counts."""
    appearances = apportion(counts, num_batches * per_batch, num_batches, rng)
    order = rng.permutation(len(counts))
    dealt = np.repeat(order, appearances[order])
    # Each label's appearances are consecutive and at most num_batches long, so dealing them round-robin
    # over the batches never gives one batch the same label twice.
    table: np.ndarray = dealt.reshape(per_batch, num_batches).T
    return table[rng.permutation(num_batches)]


def _fill_from_label_streams(
    inverse: np.ndarray, counts: np.ndarray, label_of: np.ndarray, take: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Sample positions for demands (label_of[i], take[i]), in demand order, from per-label streams."""
    by_label = np.argsort(label_of, kind="stable")
    labels = label_of[by_label]
    demand = take[by_label]
    before = np.cumsum(demand) - demand
    start = before - before[np.searchsorted(labels, labels, side="left")]
    end = start + demand
    size = counts[labels]
    label_start = np.cumsum(counts) - counts
    passes = int(((end - 1) // size).max()) + 1 if len(demand) else 1
    streams = np.empty((passes, len(inverse)), dtype=np.int64)
    streams[0] = np.argsort(inverse + 0.5 * rng.random(len(inverse)))
    for p in range(1, passes):
        crossing = (start < p * size) & (end > p * size)
        tail = np.zeros(len(counts), dtype=np.int64)
        tail[labels[crossing]] = (p * size - start)[crossing]
        previous = streams[p - 1]
        owner = inverse[previous]
        within = np.arange(len(inverse)) - label_start[owner]
        flag = np.zeros(len(inverse))
        flag[previous[within >= counts[owner] - tail[owner]]] = 1.0
        streams[p] = np.argsort(inverse + 0.5 * (rng.random(len(inverse)) + flag))
    demand_of = np.repeat(np.arange(len(demand)), demand)
    offset = np.arange(len(demand_of)) - np.repeat(before, demand)
    t = start[demand_of] + offset
    label_size = size[demand_of]
    chosen = streams[t // label_size, label_start[labels[demand_of]] + t % label_size]
    # ``chosen`` is laid out demand by demand in label order; put it back in the callers' demand order.
    return chosen[np.argsort(np.repeat(by_label, demand), kind="stable")]
