"""The study's statistics, stage picking, claims rules and metric-noise test, on inputs with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from testbed.study.claims import LEAK, judge, leaks, lowers, resists
from testbed.study.metric_noise import noise_rows, tolerance
from testbed.study.runner import pick_stages
from testbed.study.stats import Interval, cluster_bootstrap, paired_sign_flip, pooled_fraction, t_interval
from testbed.study.tables import build_cells
from testbed.study.tuning import choose_rate


def test_cluster_bootstrap_resamples_updates_not_samples() -> None:
    # one update of 30 samples all recovered, nine of 1 sample none recovered: pooled 30/39
    recovered = np.array([30, *[0] * 9])
    samples = np.array([30, *[1] * 9])
    interval = cluster_bootstrap(recovered, samples, resamples=4000, seed=1)
    assert interval.value == pytest.approx(30 / 39)
    # resampling updates: a resample without the big update has fraction 0, which happens with probability
    # (9/10)^10 = 0.35, so the lower end of the interval is 0; a sample-level bootstrap would give ~[0.64, 0.90]
    assert interval.low == 0.0
    assert interval.high == 1.0 or interval.high > 0.9


def test_when_every_update_agrees_the_interval_is_the_exact_update_level_bound() -> None:
    # the bootstrap has nothing to resample: Clopper-Pearson over updates, not a zero-width interval
    interval = cluster_bootstrap(np.array([2, 2, 2]), np.array([2, 2, 2]), resamples=500)
    assert (interval.value, interval.high) == (1.0, 1.0)
    assert interval.low == pytest.approx(scipy_stats.beta.ppf(0.025, 3, 1))  # 0.025^(1/3)
    nothing = cluster_bootstrap(np.zeros(15), np.full(15, 8), resamples=500)
    assert nothing.value == 0.0 and nothing.high == pytest.approx(scipy_stats.beta.ppf(0.975, 1, 15))  # about 0.22
    assert np.isnan(cluster_bootstrap(np.array([1]), np.array([2]), resamples=500).low)
    assert np.isnan(pooled_fraction(np.array([]), np.array([])))


def test_sign_flip_p_value_is_exact_for_small_samples() -> None:
    # four positive differences: only the all-plus and all-minus flips reach the observed |mean|: p = 2/16
    assert paired_sign_flip(np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(2 / 16)
    assert paired_sign_flip(np.zeros(5)) == 1.0
    d = np.array([0.5, -0.25, 1.0, 0.75, 0.1])
    flips = [abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product([-1, 1], repeat=5)]
    assert paired_sign_flip(d) == pytest.approx(np.mean(flips))
    # many units: the Monte Carlo p-value of a clear shift is small, of pure noise is not
    rng = np.random.default_rng(0)
    assert paired_sign_flip(rng.normal(0.5, 0.2, 40)) < 0.001
    assert paired_sign_flip(rng.normal(0.0, 1.0, 40)) > 0.01


def test_t_interval_matches_scipy() -> None:
    values = np.array([0.91, 0.93, 0.92, 0.95, 0.90])
    interval = t_interval(values)
    low, high = scipy_stats.t.interval(0.95, 4, loc=values.mean(), scale=scipy_stats.sem(values))
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))


def test_stages_are_first_evaluations_past_half_and_ninety_percent() -> None:
    curve = {0: 0.1, 10: 0.3, 20: 0.5, 30: 0.86, 40: 0.9, 50: 0.95}  # 90% of 0.95 is 0.855
    stages = pick_stages(curve, ["initial", "half", "ninety"])
    assert [(s.name, s.round) for s in stages] == [("initial", 0), ("half", 20), ("ninety", 30)]
    # a model that never learns: every threshold falls on round 0 (the runner audits that model once)
    flat = pick_stages({0: 0.1, 10: 0.1, 20: 0.1}, ["initial", "half", "ninety"])
    assert [(s.name, s.round) for s in flat] == [("initial", 0), ("half", 0), ("ninety", 0)]


def _rows(arm: str, policy: str, recovered: list[int], size: int = 2) -> list[dict[str, object]]:
    return [
        {
            "arm": arm,
            "seed": seed,
            "stage": "initial",
            "stage_round": 0,
            "stage_accuracy": 0.1,
            "policy": policy,
            "batch_size": size,
            "client": client,
            "samples": size,
            "realised_batch": size,
            "recovered": hits,
            "recovered[ce-demix]": hits,
        }
        for seed, (client, hits) in enumerate(zip(range(len(recovered)), recovered, strict=True))
    ]


def test_claims_follow_their_rules() -> None:
    mlp, softmax = "mlp-relu/fedsgd-iid", "softmax/fedsgd-iid"
    audits = [
        *_rows(mlp, "random-ce", [2] * 12),  # the baseline leaks
        *_rows(mlp, "identical-ce", [0] * 12),  # identical labels: nothing recovered from 12 updates, paired below
        *_rows(mlp, "identical-mse", [1] * 12),  # the other loss: half recovered (the best identical policy counts)
        *_rows(softmax, "random-ce", [2] * 12),
        *_rows(softmax, "distinct-ce", [2] * 12),
        *_rows(softmax, "identical-ce", [2] * 12),  # same leakage as the baseline: against the claim
    ]
    training = [
        {"arm": a, "policy": p, "seed": s, "final_accuracy": 0.9}
        for a in (mlp, softmax)
        for p in ("random-ce", "identical-ce")
        for s in range(3)
    ]
    cells = build_cells(audits, training, "random-ce", resamples=500)
    by = {(c.arm, c.policy): c for c in cells}
    assert leaks(by[(mlp, "random-ce")]) and resists(by[(mlp, "identical-ce")])
    assert lowers(by[(mlp, "identical-ce")]) and not lowers(by[(softmax, "identical-ce")])
    assert by[(mlp, "identical-ce")].cost == Interval(0.0, 0.0, 0.0)
    verdicts = {claim.text.split(" (")[0]: claim.verdict for claim in judge(cells, "random-ce", [])}
    assert verdicts["Mixing in a dense layer resists inversion"] == "refuted"  # the MLP baseline leaks at batch 2
    assert verdicts["Identical labels in a batch"] == "partly"  # resists on the MLP, not on softmax
    assert verdicts["Cross-entropy de-mixes distinct-label batches without optimisation"] == "supported"
    assert LEAK == 0.05


def test_noise_test_on_images_with_a_known_answer() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((40, 1, 12, 12)).astype(np.float32)
    labels = np.arange(40) % 4
    held = (rng.random((80, 1, 12, 12)).astype(np.float32), np.arange(80) % 4)
    rows = noise_rows(images, labels, held, sigmas=(0.01, 5.0), seed=0)
    # a copy with noise 0.01 beats every baseline under every metric; noise 5.0 (20x the pixel range) under none
    for metric in ("avd", "mse", "psnr", "ssim"):
        assert tolerance(rows, metric) == 0.01
        assert next(r["detected"] for r in rows if r["metric"] == metric and r["sigma"] == 5.0) < 0.5


def test_learning_rate_is_the_best_worst_seed() -> None:
    rows = [
        {"lr": 0.3, "seed": 100, "final_accuracy": 0.95},
        {"lr": 0.3, "seed": 101, "final_accuracy": 0.10},  # collapsed to chance on one seed
        {"lr": 0.3, "seed": 102, "final_accuracy": 0.96},
        {"lr": 0.1, "seed": 100, "final_accuracy": 0.92},
        {"lr": 0.1, "seed": 101, "final_accuracy": 0.93},
        {"lr": 0.1, "seed": 102, "final_accuracy": 0.91},
        {"lr": 0.2, "seed": 100, "final_accuracy": 0.97},
        {"lr": 0.2, "seed": 102, "final_accuracy": 0.99},  # seed 101 failed: counts as 0
    ]
    assert choose_rate(rows, [100, 101, 102]) == 0.1
    assert choose_rate(rows, [100, 102]) == 0.2
    tie = [{"lr": lr, "seed": 0, "final_accuracy": 0.9} for lr in (1.0, 0.3)]
    assert choose_rate(tie, [0]) == 0.3
    with pytest.raises(ValueError):
        choose_rate([], [0])
