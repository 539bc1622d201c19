"""The learning-rate choice of a study: the grid rate that is best on its worst tuning seed.

Plain SGD at the edge of stability trains best on most seeds and collapses to chance on a few; a rate
picked on one seed's final accuracy can be that edge. Ranking each rate by its worst final accuracy over
several tuning seeds (then its mean, then the smaller rate) prefers the rate that trains on every seed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any


def choose_rate(rows: Iterable[dict[str, Any]], seeds: Sequence[int]) -> float:
    """The learning rate of ``rows`` (one per rate and tuning seed, with ``lr``, ``seed``, ``final_accuracy``)
    whose worst final accuracy over ``seeds`` is highest; ties go to the higher mean, then the smaller rate.

    A seed with no row for a rate (its run failed) counts as accuracy 0 for that rate.
    """
    finals: dict[float, dict[int, float]] = defaultdict(dict)
    for row in rows:
        finals[float(row["lr"])][int(row["seed"])] = float(row["final_accuracy"])
    if not finals:
        raise ValueError("choose_rate: no tuning runs")

    def rank(lr: float) -> tuple[float, float, float]:
        values = [finals[lr].get(seed, 0.0) for seed in seeds]
        return (min(values), sum(values) / len(values), -lr)

    return max(finals, key=rank)
