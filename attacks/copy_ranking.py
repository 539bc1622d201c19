"""dense-ratio's ranking of candidate rows for many updates at once, from the rows' unit vectors.

``rank_by_similarity`` (attacks.dense_ratio) reads two relations of a view's candidates: which pairs are
copies (cosine at least ``copy_cosine``) and which are close (above ``dedup_cosine``). Here both come from
the unit vectors of the candidates (H per view, r components: the rows of a thin SVD's L) without an
H x H matrix:

- copies: two unit vectors at cosine c are sqrt(2 - 2c) apart, and their projections onto one fixed
  unit direction no further; after sorting the projections, only neighbours within
  sqrt(2 (1 - copy_cosine)) can be copies, and only those are verified (float64 cosine). With a copy
  threshold below ``SCREEN_LIMIT``'s, the window would hold most rows: the cosines are then all taken.
- closeness is only ever asked of a candidate against the rows already kept (at most ``limit`` of
  them), so the greedy merge takes those cosines as it goes, for every view at once.

The answer of each view equals ``rank_by_similarity`` on the float64 cosines of its usable rows (tested)
for thresholds between -1 + 1e-9 and 1 - 1e-9; nearer to +-1 a decision turns on the last bit of a
cosine, and dense-ratio ranks such views one by one from the matrix product, as its reference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SAFE_THRESHOLD = 1 - 1e-9
"""Thresholds above this (or below its negative) are decided by the round-off of a row's own norm."""
SCREEN_LIMIT = 0.05
"""Widest projection window (sqrt(2 (1 - copy_cosine)); 0.05 is a copy threshold of 0.99875) screened."""
SCREEN_COMPONENTS = 8
"""Fewest components worth screening: below, all H x H cosines cost at most 8 H^2 multiply-adds a view (and
rows of a rank-1 or rank-2 update are mostly copies of each other, which the screen would pair one by one)."""
DISTANCE_ROUND_OFF = 1e-13
"""Slack on the squared window for the float64 round-off of a cosine of unit vectors (about r x 1e-16)."""
ROUND_OFF = 1e-8
"""Slack on the window for the round-off of unit lengths and projections (about r x 1e-16)."""
DENSE_BLOCK = 16
"""Views whose all-pairs cosines are taken per batched product when the window is too wide."""


def _direction(components: int) -> np.ndarray:
    """A fixed unit direction (seeded, so that every run screens the same way)."""
    direction = np.random.default_rng(0x5EED).standard_normal(components)
    return direction / np.linalg.norm(direction)


def copy_support(unit: np.ndarray, usable: np.ndarray, copy_cosine: float) -> np.ndarray:
    """(V, H): how many usable rows of its view (itself included) each row reaches ``copy_cosine`` with.

    ``unit`` is (V, H, r) float64, each row of unit length or zero; ``usable`` (V, H) boolean.
    """
    views, rows, components = unit.shape
    window = math.sqrt(2.0 * max(1.0 - copy_cosine, 0.0) + DISTANCE_ROUND_OFF) + ROUND_OFF
    if copy_cosine <= 0 or window > SCREEN_LIMIT or components < SCREEN_COMPONENTS:
        support = np.zeros((views, rows), dtype=np.int64)
        for start in range(0, views, DENSE_BLOCK):
            block = slice(start, start + DENSE_BLOCK)
            cosines = unit[block] @ unit[block].transpose(0, 2, 1)
            support[block] = np.count_nonzero((cosines >= copy_cosine) & usable[block, None, :], axis=2)
        return np.where(usable, support, 0)
    support = (np.einsum("vhr,vhr->vh", unit, unit) >= copy_cosine) & usable  # a row with itself
    counts = support.astype(np.int64)
    projection = np.where(usable, unit @ _direction(components), np.nan)  # unusable rows sort last, pair never
    order = np.argsort(projection, axis=1)
    ordered = np.take_along_axis(projection, order, axis=1)
    for offset in range(1, rows):
        near = ordered[:, offset:] - ordered[:, :-offset] <= window
        if not near.any():
            break  # sorted: a wider offset only spans wider gaps
        view, position = np.nonzero(near)
        first, second = order[view, position], order[view, position + offset]
        copies = np.einsum("pr,pr->p", unit[view, first], unit[view, second]) >= copy_cosine
        np.add.at(counts, (view[copies], first[copies]), 1)
        np.add.at(counts, (view[copies], second[copies]), 1)
    return counts


def rank_by_units(
    unit: np.ndarray,
    usable: np.ndarray,
    magnitude: np.ndarray,
    limits: Sequence[int],
    copy_cosine: float,
    dedup_cosine: float,
) -> list[tuple[list[int], np.ndarray]]:
    """``rank_by_similarity`` of V views at once: per view, the kept row indices and their support.

    ``unit`` (V, H, r) holds each candidate's unit vector (zero for a zero row), ``usable`` and
    ``magnitude`` (|gb|) are (V, H); only usable rows are candidates. The greedy merge walks the V orders
    together, one candidate of every view per step, its cosines with the view's kept rows taken then.
    """
    if max(abs(copy_cosine), abs(dedup_cosine)) > SAFE_THRESHOLD:
        raise ValueError(
            f"rank_by_units: thresholds must lie within {SAFE_THRESHOLD} of 0 (the last bit of a cosine decides "
            f"beyond), got copy {copy_cosine} and dedup {dedup_cosine}"
        )
    views, rows, components = unit.shape
    support = copy_support(unit, usable, copy_cosine)
    order = np.lexsort((-magnitude, -np.where(usable, support, -1)), axis=-1)  # unusable rows last
    limit = np.asarray(limits, dtype=np.int64)
    most = int(limit.max()) if views else 0
    kept = np.zeros((views, most, components))
    chosen = np.zeros((views, most), dtype=np.int64)
    count = np.zeros(views, dtype=np.int64)
    every = np.arange(views)
    slots = np.arange(most)
    for step in range(rows):
        index = order[:, step]
        trying = usable[every, index] & (count < limit)
        if not trying.any():
            break  # usable rows come first, so every view is done
        active, index = every[trying], index[trying]
        candidate = unit[active, index]
        cosines = np.einsum("ar,akr->ak", candidate, kept[active])
        merged = ((cosines > dedup_cosine) & (slots[None, :] < count[active, None])).any(axis=1)
        active, index, candidate = active[~merged], index[~merged], candidate[~merged]
        kept[active, count[active]] = candidate
        chosen[active, count[active]] = index
        count[active] += 1
    return [(chosen[v, : count[v]].tolist(), support[v, chosen[v, : count[v]]]) for v in range(views)]
