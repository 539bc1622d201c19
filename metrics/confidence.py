"""A time-uniform confidence sequence for the mean of observations in [0, 1].

``betting_confidence_sequence`` is the hedged betting confidence sequence of Waudby-Smith & Ramdas
(2023, "Estimating means of bounded random variables by betting", JRSS-B, Theorem 3 with the
predictable plug-in bets of their section 5): for each candidate mean ``m`` two gamblers bet that the
mean is above and below ``m`` with bets fixed before each observation; ``m`` is ruled out once half of
one's capital plus half of the other's could reach ``1 / alpha``. By Ville's inequality the true mean
is inside *every* interval of the sequence at once with probability at least ``1 - alpha``, so the
interval stays valid when the number of observations is chosen by looking at the intervals (stop once
narrow enough), which a fixed-n interval (Clopper-Pearson, Wald) read at every step does not.

The guarantee needs each observation's mean, given the earlier ones, to be the same ``m``: i.i.d.
draws, or draws at random from a fixed population. Observations need not be 0/1; fractions in
[0, 1] are fine.
"""

from __future__ import annotations

import math

import numpy as np

GRID_POINTS = 1000
"""Candidate means are checked on a grid of this many steps over [0, 1]; each end is widened by one step."""
MAX_BET = 0.75
"""The largest fraction of the capital a gambler stakes (``c`` in Waudby-Smith & Ramdas)."""


def betting_confidence_sequence(
    observations: np.ndarray, alpha: float = 0.05, grid: int = GRID_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The running ``1 - alpha`` confidence sequence after each observation: ``(low, high)``.

    ``observations``: values in [0, 1], shape ``(n,)`` or ``(sequences, n)`` (each row its own
    sequence, computed at once). Returns arrays of the same shape: the interval after the first ``t``
    observations at position ``t - 1``, the running intersection of the intervals so far (still valid:
    the guarantee holds for all of them at once). Should the intersection ever be empty (an event of
    probability below ``alpha``), the previous interval is kept.
    """
    x = np.asarray(observations, dtype=np.float64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    if x.size and (np.nanmin(x) < 0.0 or np.nanmax(x) > 1.0 or not np.isfinite(x).all()):
        raise ValueError("observations must be finite and within [0, 1]")
    rows, steps = x.shape
    means = np.linspace(0.0, 1.0, grid + 1)
    with np.errstate(divide="ignore"):
        up_cap = np.where(means > 0, MAX_BET / means, np.inf)
        down_cap = np.where(means < 1, MAX_BET / (1.0 - means), np.inf)
    log_up = np.zeros((rows, grid + 1))
    log_down = np.zeros((rows, grid + 1))
    alive = np.ones((rows, grid + 1), dtype=bool)
    threshold = math.log(1.0 / alpha)
    low = np.zeros((rows, steps))
    high = np.ones((rows, steps))
    total = np.zeros(rows)
    squares = np.zeros(rows)
    variance = np.full(rows, 0.25)
    last_low, last_high = np.zeros(rows), np.ones(rows)
    for t in range(1, steps + 1):
        value = x[:, t - 1]
        bet = np.sqrt(2.0 * math.log(2.0 / alpha) / (variance * t * math.log(1.0 + t)))[:, None]
        gap = value[:, None] - means[None, :]
        log_up += np.log1p(np.minimum(bet, up_cap) * gap)
        log_down += np.log1p(-np.minimum(bet, down_cap) * gap)
        hedged = np.maximum(log_up, log_down) + math.log(0.5)
        kept = alive & (hedged < threshold)
        empty: np.ndarray = ~np.any(kept, axis=1)
        alive = np.where(empty[:, None], alive, kept)
        first = np.argmax(alive, axis=1)
        last = grid - np.argmax(alive[:, ::-1], axis=1)
        last_low = np.where(empty, last_low, means[np.maximum(first - 1, 0)])
        last_high = np.where(empty, last_high, means[np.minimum(last + 1, grid)])
        low[:, t - 1], high[:, t - 1] = last_low, last_high
        total += value
        estimate = (0.5 + total) / (t + 1)
        squares += (value - estimate) ** 2
        variance = (0.25 + squares) / (t + 1)
    return (low[0], high[0]) if single else (low, high)
