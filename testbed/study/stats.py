"""The study's statistics with the trained model (the seed) as the unit.

The audited updates of one seed attack one and the same trained model, so they are not independent
replicates: every interval and test here works on one number per seed.

- A cell's leakage is the mean over seeds of each seed's recovered fraction. Its interval is the
  Clopper-Pearson (1934) interval with the seed as the trial and the seeds' fractions summed as the
  successes (``seed_interval``): exact when each seed recovers all or nothing of its samples, and a
  seed's fraction in [0, 1] never varies more than such an all-or-nothing seed with the same mean.
  Both ends rise with the count (never narrowing towards 0 or 1), and all five of five seeds give
  ``[0.025^(1/5), 1] = [0.48, 1]``. ``versus_level`` is the p-value of the same beta distributions
  against a level, so the interval and the test agree.
- A paired comparison (a policy against the baseline, the same models and clients) is the mean over
  seeds of the seeds' differences; its p-value is the exact sign-flip (randomisation) test over seeds
  and its interval the set of shifts that test does not reject (``sign_flip``): one method for both.
  With ``n`` seeds the smallest two-sided p is ``2 / 2^n`` (0.0625 for 5).
- Accuracy costs are paired by seed with a Student t interval and the t test's p-value.
- ``holm`` adjusts a claim's p-values (Holm 1979); ``seeds_for_significance`` is the fewest seeds at
  which an exact sign-flip test can reach the Holm threshold at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import stats

EXACT_UP_TO = 16  # seeds up to which every sign assignment is enumerated


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """One estimand with its interval and p-value from the same method, and the seeds behind it."""

    value: float
    low: float
    high: float
    p_value: float
    seeds: int

    @property
    def interval(self) -> Interval:
        """The estimate with its interval."""
        return Interval(self.value, self.low, self.high)


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan)


def seed_fractions(recovered: np.ndarray, samples: np.ndarray, seeds: np.ndarray) -> dict[object, float]:
    """Per seed, its recovered fraction ``sum(recovered) / sum(samples)`` over its updates."""
    out: dict[object, float] = {}
    for seed in dict.fromkeys(seeds.tolist()):
        mine = seeds == seed
        total = float(np.sum(samples[mine]))
        if total > 0:
            out[seed] = float(np.sum(recovered[mine])) / total
    return out


def seed_interval(fractions: Sequence[float], alpha: float = 0.05) -> Interval:
    """The mean of per-seed fractions with its Clopper-Pearson interval over seeds (see the module docstring)."""
    values = np.clip(np.asarray([f for f in fractions if math.isfinite(f)], dtype=np.float64), 0.0, 1.0)
    n = len(values)
    if n == 0:
        return NAN_INTERVAL
    x = float(values.sum())
    low = float(stats.beta.ppf(alpha / 2, x, n - x + 1)) if x > 0 else 0.0
    high = float(stats.beta.ppf(1 - alpha / 2, x + 1, n - x)) if x < n else 1.0
    return Interval(x / n, low, high)


def versus_level(fractions: Sequence[float], level: float) -> float:
    """Two-sided p-value that the mean seed fraction equals ``level``, by the beta distributions of
    ``seed_interval`` (the interval at ``alpha`` excludes ``level`` exactly when this is below ``alpha``)."""
    values = np.clip(np.asarray([f for f in fractions if math.isfinite(f)], dtype=np.float64), 0.0, 1.0)
    n = len(values)
    if n == 0:
        return math.nan
    x = float(values.sum())
    above = float(stats.beta.cdf(level, x, n - x + 1)) if x > 0 else 1.0  # evidence the mean exceeds level
    below = float(stats.beta.sf(level, x + 1, n - x)) if x < n else 1.0  # evidence it falls short of it
    return min(1.0, 2 * min(above, below))


@cache
def _signs(n: int) -> np.ndarray:
    return 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)


def _exact_p(shifted: np.ndarray) -> np.ndarray:
    """Exact two-sided sign-flip p-values of each row of ``shifted`` (rows: candidate shifts, columns: seeds)."""
    signs = _signs(shifted.shape[1]).astype(np.float64)
    observed = np.abs(shifted.mean(axis=1)) - 1e-12
    flipped = np.abs(shifted @ signs.T) / shifted.shape[1]  # |mean| under every sign assignment
    p = np.mean(flipped >= observed[:, None], axis=1)
    return np.where(np.any(shifted != 0, axis=1), p, 1.0)


def sign_flip_p(differences: np.ndarray, resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a zero mean seed difference: exact over all ``2^n`` sign flips up to
    ``EXACT_UP_TO`` seeds, else ``resamples`` random flips with the observed one counted."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0 or not np.any(d):
        return 1.0
    if len(d) <= EXACT_UP_TO:
        return float(_exact_p(d[None, :])[0])
    observed = abs(d.mean()) - 1e-12
    rng = np.random.default_rng(seed)
    flips = rng.choice(np.array([-1.0, 1.0]), size=(resamples, len(d)))
    return float((1 + np.sum(np.abs((flips * d).mean(axis=1)) >= observed)) / (resamples + 1))


def _p_over(d: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """The sign-flip p-value of ``d - shift`` for every shift."""
    if len(d) <= EXACT_UP_TO:
        return _exact_p(d[None, :] - shifts[:, None])
    return np.array([sign_flip_p(d - shift) for shift in shifts])


def sign_flip(differences: np.ndarray, alpha: float = 0.05, bound: float = 1.0, step: float = 0.001) -> Comparison:
    """The mean seed difference, its exact sign-flip p-value, and its interval by inverting that test.

    The interval holds every shift ``delta`` in ``[-bound, bound]`` (the range of a difference of
    fractions) for which the test of ``differences - delta`` does not reject at ``alpha``, on a grid of
    ``step``: with too few seeds to ever reject, it is the whole range.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, 0)
    p = sign_flip_p(d)
    grid = np.arange(-bound, bound + step / 2, step)
    kept = grid[_p_over(d, grid) >= alpha]
    mean = float(d.mean())
    low, high = (round(float(kept.min()), 9), round(float(kept.max()), 9)) if len(kept) else (mean, mean)
    return Comparison(mean, min(low, mean), max(high, mean), p, len(d))


def minimum_detectable(differences: np.ndarray, alpha: float, step: float = 0.005, bound: float = 1.0) -> float:
    """The smallest shift the exact sign-flip test would detect at ``alpha`` with these seeds' spread: the
    least ``delta`` in ``[0, bound]`` at which the centred differences plus ``delta`` reach p < ``alpha``
    (infinite when no shift can, e.g. 5 seeds at alpha 0.05)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0 or 2.0 / 2 ** len(d) >= alpha:
        return math.inf
    grid = np.arange(0.0, bound + step / 2, step)
    detected = grid[_p_over(d - d.mean(), -grid) < alpha]
    return float(detected.min()) if len(detected) else math.inf


def seeds_for_significance(comparisons: int, alpha: float) -> int:
    """The fewest seeds at which an exact two-sided sign-flip test can reach Holm's smallest threshold
    ``alpha / comparisons`` (its smallest p-value is ``2 / 2^n``)."""
    m = max(comparisons, 1)
    n = 1
    while 2.0 / 2**n >= alpha / m:
        n += 1
    return n


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given (NaN stays NaN and is not counted)."""
    finite = [(p, i) for i, p in enumerate(p_values) if math.isfinite(p)]
    finite.sort()
    m = len(finite)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def t_comparison(values: np.ndarray, alpha: float = 0.05) -> Comparison:
    """The mean of ``values`` (one per seed) with its Student t interval and the t test's p-value of zero."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n < 2:
        return Comparison(mean, math.nan, math.nan, math.nan, 1)
    sd = float(values.std(ddof=1))
    if sd == 0:
        return Comparison(mean, mean, mean, 1.0 if mean == 0 else 0.0, n)
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return Comparison(mean, mean - half, mean + half, p, n)


def t_interval(values: np.ndarray) -> Interval:
    """The mean of ``values`` (one per seed) with a two-sided 95% Student t interval."""
    return t_comparison(values).interval
