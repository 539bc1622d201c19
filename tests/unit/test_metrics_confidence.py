"""The betting confidence sequence keeps its 95% coverage at every step at once, where peeking at a fixed-n
interval does not, and narrows as it should."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from metrics.confidence import betting_confidence_sequence

SEQUENCES, STEPS, GRID = 2000, 100, 500


def _miss_bound(alpha: float = 0.05) -> float:
    return alpha + 3 * float(np.sqrt(alpha * (1 - alpha) / SEQUENCES))  # 0.0646 for 2,000 sequences


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_the_true_mean_is_inside_every_interval_of_a_sequence_at_once(p: float) -> None:
    rng = np.random.default_rng(20230)
    draws = (rng.random((SEQUENCES, STEPS)) < p).astype(np.float64)
    low, high = betting_confidence_sequence(draws, grid=GRID)
    missed = np.mean(((low > p) | (high < p)).any(axis=1))
    assert missed <= _miss_bound(), missed
    assert (np.diff(low, axis=1) >= 0).all() and (np.diff(high, axis=1) <= 0).all()  # running intersection
    half = np.mean(high[:, -1] - low[:, -1]) / 2
    assert half < {0.05: 0.08, 0.3: 0.18, 0.9: 0.11}[p], half  # 100 draws narrow it (Wald: 0.04, 0.09, 0.06)


def test_peeking_at_clopper_pearson_after_every_draw_misses_more_often() -> None:
    # the reason for a confidence sequence: stop-when-narrow on a fixed-n interval loses its 95%
    rng = np.random.default_rng(20230)
    p = 0.3
    draws = rng.random((SEQUENCES, STEPS)) < p
    k = np.cumsum(draws, axis=1)
    n = np.arange(1, STEPS + 1)
    low = np.where(k > 0, stats.beta.ppf(0.025, k, n - k + 1), 0.0)
    high = np.where(k < n, stats.beta.ppf(0.975, k + 1, n - k), 1.0)
    assert np.mean(((low > p) | (high < p)).any(axis=1)) > 2 * _miss_bound()


def test_all_recovered_updates_reach_a_half_width_of_005_within_fifty() -> None:
    low, high = betting_confidence_sequence(np.ones(60))
    half = (high - low) / 2
    assert high[-1] == 1.0 and half[9] > 0.15
    reached = int(np.argmax(half <= 0.05)) + 1
    assert 40 <= reached <= 50, reached  # a fixed-n Clopper-Pearson would need 36 (its one look)
    single = betting_confidence_sequence(np.array([0.5, 0.25, 1.0]))
    assert single[0].shape == (3,) and (single[0] <= 0.5).all() and (single[1] >= 0.5).all()


def test_values_outside_zero_one_are_refused() -> None:
    with pytest.raises(ValueError, match="within"):
        betting_confidence_sequence(np.array([0.5, 1.5]))
