"""Graded leakage: how much leaks short of a near copy, judged beyond the no-information baselines.

"Recovered" (``metrics.recovered_beyond``) asks for a near copy. A reader also needs to see how much
leaks below that: a reconstruction at SSIM 0.7 that beats every baseline shows the person the data.
Per sample, the SSIM *beyond the baselines* is its best SSIM when that is above the best baseline's
SSIM, and ``-1`` (the worst SSIM) otherwise. Per group of samples (a cell of a study, a group of a
run), ``graded_leakage`` gives the fraction of samples at or above each SSIM level beyond the
baselines (``SSIM_LEVELS``: 0.5 and 0.7), the strict recovered fraction, and the median and quartiles
of the samples' best SSIM. The study and the runs both call this one function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SSIM_LEVELS: tuple[float, ...] = (0.5, 0.7)
"""The SSIM levels of the graded ladder, below the strict near-copy threshold (0.9)."""

_WORST_SSIM = -1.0


def ssim_beyond_baselines(ssim: np.ndarray, baseline_ssim: np.ndarray | None = None) -> np.ndarray:
    """Per sample, its SSIM where it is above the best baseline's SSIM, else -1 (no credit).

    ``ssim`` is each sample's best SSIM over the attacks (1-D); ``baseline_ssim`` the best SSIM any
    no-information baseline reaches on that sample (same shape), or None when there are no baselines.
    NaN SSIMs (unrecoverable samples) count as -1.
    """
    values = np.asarray(ssim, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"ssim must be one-dimensional, got shape {values.shape}")
    values = np.where(np.isnan(values), _WORST_SSIM, values)
    if baseline_ssim is None:
        return values
    floor = np.asarray(baseline_ssim, dtype=np.float64)
    if floor.shape != values.shape:
        raise ValueError(f"baseline_ssim must have the shape of ssim {values.shape}, got {floor.shape}")
    return np.where(values > np.nan_to_num(floor, nan=_WORST_SSIM), values, _WORST_SSIM)


@dataclass(frozen=True)
class GradedLeakage:
    """The graded leakage of a set of samples (see the module docstring)."""

    n: int
    at_least: dict[float, float]
    """SSIM level -> fraction of samples at or above it and beyond the baselines."""
    recovered: float
    """The strict recovered fraction (near copy beyond the baselines), as given."""
    ssim_quartiles: tuple[float, float, float]
    """First quartile, median and third quartile of the samples' best SSIM (NaN when empty)."""

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat names for logging: ``ssim_ge_0.5``, ``ssim_ge_0.7``, ``recovered``, ``ssim_q1/median/q3``."""
        out = {f"{prefix}{level_name(level)}": value for level, value in self.at_least.items()}
        out[f"{prefix}recovered"] = self.recovered
        for name, value in zip(("ssim_q1", "ssim_median", "ssim_q3"), self.ssim_quartiles, strict=True):
            out[f"{prefix}{name}"] = value
        return out


def level_name(level: float) -> str:
    """The metric name of an SSIM level of the ladder: 0.5 -> ``ssim_ge_0.5``."""
    return f"ssim_ge_{level:g}"


def graded_leakage(
    ssim: np.ndarray,
    recovered: np.ndarray,
    baseline_ssim: np.ndarray | None = None,
    *,
    levels: Sequence[float] = SSIM_LEVELS,
) -> GradedLeakage:
    """The SSIM ladder of a set of samples.

    ``ssim``: each sample's best SSIM (1-D); ``recovered``: the strict per-sample verdict
    (``metrics.recovered_beyond``), same length; ``baseline_ssim``: the best baseline SSIM per sample or
    None. A sample counts at level ``t`` when its SSIM is at least ``t`` and beyond the baselines.
    """
    for level in levels:
        if not (math.isfinite(level) and -1.0 <= level <= 1.0):
            raise ValueError(f"SSIM levels must lie in [-1, 1], got {level}")
    beyond = ssim_beyond_baselines(ssim, baseline_ssim)
    passed = np.asarray(recovered, dtype=bool)
    if passed.shape != beyond.shape:
        raise ValueError(f"recovered must have the shape of ssim {beyond.shape}, got {passed.shape}")
    n = len(beyond)
    if n == 0:
        return GradedLeakage(0, {float(t): math.nan for t in levels}, math.nan, (math.nan, math.nan, math.nan))
    raw = np.asarray(ssim, dtype=np.float64)
    finite = raw[np.isfinite(raw)]
    quartiles = tuple(float(q) for q in np.quantile(finite, (0.25, 0.5, 0.75))) if finite.size else (math.nan,) * 3
    return GradedLeakage(
        n=n,
        at_least={float(t): float(np.mean(beyond >= t)) for t in levels},
        recovered=float(np.mean(passed)),
        ssim_quartiles=(quartiles[0], quartiles[1], quartiles[2]),
    )
