"""graded_leakage: the SSIM ladder beyond the no-information baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metrics import SSIM_LEVELS, graded_leakage, ssim_beyond_baselines


def test_a_sample_counts_at_a_level_only_beyond_its_best_baseline() -> None:
    ssim = np.array([0.95, 0.75, 0.6, 0.3, np.nan])
    baseline = np.array([0.2, 0.8, 0.1, 0.1, 0.0])  # the second sample is no better than its class mean
    beyond = ssim_beyond_baselines(ssim, baseline)
    assert beyond.tolist() == [0.95, -1.0, 0.6, 0.3, -1.0]
    graded = graded_leakage(ssim, np.array([True, False, False, False, False]), baseline)
    assert graded.n == 5
    assert graded.at_least == {0.5: 2 / 5, 0.7: 1 / 5}
    assert graded.recovered == 1 / 5
    assert graded.ssim_quartiles == tuple(float(q) for q in np.quantile([0.95, 0.75, 0.6, 0.3], (0.25, 0.5, 0.75)))


def test_the_ladder_is_monotone_and_names_its_levels() -> None:
    rng = np.random.default_rng(0)
    ssim = rng.uniform(-0.2, 1.0, 200)
    graded = graded_leakage(ssim, ssim >= 0.9, None, levels=(0.3, 0.5, 0.7, 0.9))
    fractions = [graded.at_least[t] for t in (0.3, 0.5, 0.7, 0.9)]
    assert fractions == sorted(fractions, reverse=True)
    assert graded.at_least[0.9] == graded.recovered
    names = graded_leakage(ssim, ssim >= 0.9).as_metrics("leak/")
    assert set(names) == {
        "leak/ssim_ge_0.5",
        "leak/ssim_ge_0.7",
        "leak/recovered",
        "leak/ssim_q1",
        "leak/ssim_median",
        "leak/ssim_q3",
    }
    assert SSIM_LEVELS == (0.5, 0.7)


def test_empty_and_bad_input() -> None:
    empty = graded_leakage(np.array([]), np.array([], dtype=bool))
    assert empty.n == 0 and math.isnan(empty.recovered) and all(math.isnan(v) for v in empty.at_least.values())
    with pytest.raises(ValueError, match="baseline_ssim"):
        ssim_beyond_baselines(np.array([0.5]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="levels"):
        graded_leakage(np.array([0.5]), np.array([True]), levels=(math.inf,))
