"""The study's statistics: cluster-bootstrap intervals over audited updates, paired tests, seed intervals.

Samples of one update share a model, a batch and an attack run, so they are not independent: intervals
resample whole updates (the cluster bootstrap) and recompute the pooled recovered fraction
``sum(recovered) / sum(samples)``. Policies are compared on the same (seed, stage, client) units, which
saw the same global model: the paired difference of each unit's recovered fraction is tested by a
sign-flip permutation test. Accuracy costs are paired by seed (same initial model, partition and client
sampling) with a Student t interval over the seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided 95% interval."""

    value: float
    low: float
    high: float


def pooled_fraction(recovered: np.ndarray, samples: np.ndarray) -> float:
    """sum(recovered) / sum(samples), NaN without samples."""
    total = float(np.sum(samples))
    return float(np.sum(recovered)) / total if total > 0 else float("nan")


def cluster_bootstrap(recovered: np.ndarray, samples: np.ndarray, resamples: int, seed: int = 0) -> Interval:
    """The pooled recovered fraction with a 95% interval from resampling whole updates.

    When every update agrees (none recovered anything, or each recovered all its samples) the bootstrap has
    nothing to resample and would give a zero-width interval; the interval is then the exact (Clopper-Pearson)
    bound on the share of updates that leak, ``[0, 1 - 0.025^(1/n)]`` or ``[0.025^(1/n), 1]`` for ``n``
    updates: a conservative bound on the pooled fraction, since samples of one update are not independent.
    """
    recovered = np.asarray(recovered, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    value = pooled_fraction(recovered, samples)
    if len(samples) < 1 or not np.isfinite(value):
        return Interval(value, float("nan"), float("nan"))
    shares = recovered / np.maximum(samples, 1.0)
    if np.all(shares == 0):
        return Interval(value, 0.0, float(1 - 0.025 ** (1 / len(samples))))
    if np.all(shares == 1):
        return Interval(value, float(0.025 ** (1 / len(samples))), 1.0)
    if len(samples) < 2:
        return Interval(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(samples), size=(resamples, len(samples)))
    totals = samples[picks].sum(axis=1)
    fractions = np.where(totals > 0, recovered[picks].sum(axis=1) / np.maximum(totals, 1e-300), np.nan)
    low, high = np.nanpercentile(fractions, [2.5, 97.5])
    return Interval(value, float(low), float(high))


def paired_pooled_difference(
    mine: np.ndarray,
    theirs: np.ndarray,
    samples_mine: np.ndarray,
    samples_theirs: np.ndarray,
    resamples: int,
    seed: int = 0,
) -> Interval:
    """Pooled recovered fraction of one policy minus another's over the same units, with a 95% interval from
    resampling units (each unit: the same seed, stage, client and global model under both policies)."""
    mine, theirs = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    samples_mine, samples_theirs = (
        np.asarray(samples_mine, dtype=np.float64),
        np.asarray(samples_theirs, dtype=np.float64),
    )
    value = pooled_fraction(mine, samples_mine) - pooled_fraction(theirs, samples_theirs)
    if len(mine) < 2:
        return Interval(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(mine), size=(resamples, len(mine)))
    first = mine[picks].sum(axis=1) / np.maximum(samples_mine[picks].sum(axis=1), 1e-300)
    second = theirs[picks].sum(axis=1) / np.maximum(samples_theirs[picks].sum(axis=1), 1e-300)
    low, high = np.percentile(first - second, [2.5, 97.5])
    return Interval(value, float(low), float(high))


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int = 0) -> Interval:
    """The mean of ``values`` (one per update) with a 95% percentile bootstrap interval over updates."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    if len(values) < 2:
        return Interval(float(values.mean()), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(values.mean()), float(low), float(high))


def paired_sign_flip(differences: np.ndarray, resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a zero mean paired difference: exact over all 2^n sign flips for up to 16 units,
    else ``resamples`` random flips (with the observed assignment counted)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean())
    if len(d) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        means = np.abs((signs * d).mean(axis=1))
        return float(np.mean(means >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, len(d)))
    means = np.abs((signs * d).mean(axis=1))
    return float((1 + np.sum(means >= observed - 1e-12)) / (resamples + 1))


def t_interval(values: np.ndarray) -> Interval:
    """The mean of ``values`` (one per seed) with a two-sided 95% Student t interval."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return Interval(mean, mean - half, mean + half)
