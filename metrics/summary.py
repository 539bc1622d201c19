"""Summarising the leakage of one attacked batch (or many pooled samples) into a few numbers."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from metrics.classification import as_label_array
from metrics.conventions import METRIC_NAMES
from metrics.matching import MatchResult
from metrics.recovery import DEFAULT_AVD_THRESHOLD, DEFAULT_SSIM_THRESHOLD, recovered


@dataclass(frozen=True)
class LeakageSummary:
    """Aggregate leakage of ``n`` samples.

    ``mean`` and ``median`` map each metric name to its mean and median over the recoverable samples
    (finite AVD) whose value of that metric is finite; NaN when there are none. ``unrecoverable`` is
    the fraction of samples with non-finite AVD (NaN reconstruction or no reconstruction matched),
    ``recovered_fraction`` the fraction that pass ``metrics.recovered``, and ``label_accuracy`` the
    fraction of true labels found in the inferred labels (None when labels were not given).
    """

    n: int
    mean: dict[str, float]
    median: dict[str, float]
    unrecoverable: float
    recovered_fraction: float
    label_accuracy: float | None = None

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix}<name>`` -> value map of the finite numbers, ready for a metrics logger.

        Names: ``n``, ``<metric>_mean`` and ``<metric>_median`` for avd, mse, psnr and ssim,
        ``unrecoverable``, ``recovered_fraction`` and ``label_accuracy``; NaN, infinite and None
        values are left out.
        """
        values: dict[str, float | None] = {"n": float(self.n)}
        for name in METRIC_NAMES:
            values[f"{name}_mean"] = self.mean.get(name)
            values[f"{name}_median"] = self.median.get(name)
        values["unrecoverable"] = self.unrecoverable
        values["recovered_fraction"] = self.recovered_fraction
        values["label_accuracy"] = self.label_accuracy
        return {
            f"{prefix}{key}": float(value)
            for key, value in values.items()
            if value is not None and math.isfinite(value)
        }


def label_accuracy(true_labels: Any, inferred_labels: Any) -> float:
    """Size of the multiset intersection of true and inferred labels, divided by the number of true labels.

    Order does not matter: true [1, 1, 3] against inferred [3, 1, 7] scores 2/3.
    """
    truth = as_label_array(true_labels, "true_labels")
    if len(truth) == 0:
        raise ValueError("true_labels: need at least one label to compute a label accuracy")
    inferred = as_label_array(inferred_labels, "inferred_labels")
    common = Counter(truth.tolist()) & Counter(inferred.tolist())
    return sum(common.values()) / len(truth)


def _finite_statistics(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.median(finite))


def summarize(
    match: MatchResult,
    *,
    true_labels: Any = None,
    inferred_labels: Any = None,
    ssim_threshold: float = DEFAULT_SSIM_THRESHOLD,
    avd_threshold: float = DEFAULT_AVD_THRESHOLD,
) -> LeakageSummary:
    """Summarise a ``MatchResult``: per-metric mean and median, unrecoverable and recovered fractions.

    Means and medians are over the samples with finite AVD only, so every metric describes the same
    images; the others are counted in ``unrecoverable``. ``label_accuracy`` is computed when both
    ``true_labels`` (one per original) and ``inferred_labels`` are given and there is a sample.
    """
    n = match.n
    distance = np.asarray(match.scores["avd"], dtype=np.float64)
    recoverable = np.isfinite(distance)
    mean: dict[str, float] = {}
    median: dict[str, float] = {}
    for name in METRIC_NAMES:
        values = np.asarray(match.scores[name], dtype=np.float64)
        mean[name], median[name] = _finite_statistics(values[recoverable])
    labels: float | None = None
    if n and true_labels is not None and inferred_labels is not None:
        if len(as_label_array(true_labels, "true_labels")) != n:
            raise ValueError(f"true_labels must hold one label per original ({n})")
        labels = label_accuracy(true_labels, inferred_labels)
    passed = recovered(match.scores, ssim_threshold=ssim_threshold, avd_threshold=avd_threshold)
    return LeakageSummary(
        n=n,
        mean=mean,
        median=median,
        unrecoverable=float(np.mean(~recoverable)) if n else math.nan,
        recovered_fraction=float(np.mean(passed)) if n else math.nan,
        label_accuracy=labels,
    )
