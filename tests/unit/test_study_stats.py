"""The study's statistics, stage picking, claims rules and metric-noise test, on inputs with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from testbed.study.claims import INCONCLUSIVE, REFUTED, SUPPORTED, judge
from testbed.study.metric_noise import noise_rows, tolerance
from testbed.study.runner import pick_stages
from testbed.study.spec import StudySpec
from testbed.study.stats import (
    holm,
    minimum_detectable,
    seed_interval,
    seeds_for_significance,
    sign_flip,
    sign_flip_p,
    t_comparison,
    t_interval,
    versus_level,
)
from testbed.study.tables import build_cells
from testbed.study.tuning import choose_rate


def test_an_all_recovered_five_seed_cell_is_about_048_to_1() -> None:
    # the seed is the trial: 5 of 5 all recovered gives Clopper-Pearson's [0.025^(1/5), 1], not [0.78, 1]
    interval = seed_interval([1.0] * 5)
    assert interval.value == 1.0 and interval.high == 1.0
    assert interval.low == pytest.approx(0.025 ** (1 / 5)) and interval.low == pytest.approx(0.478, abs=1e-3)
    nothing = seed_interval([0.0] * 5)
    assert nothing.low == 0.0 and nothing.high == pytest.approx(1 - 0.025 ** (1 / 5))
    # whole-seed outcomes make it the exact binomial interval: 3 of 5 seeds
    low, high = scipy_stats.binomtest(3, 5).proportion_ci(method="exact")
    assert (seed_interval([1, 1, 1, 0, 0]).low, seed_interval([1, 1, 1, 0, 0]).high) == (
        pytest.approx(low),
        pytest.approx(high),
    )


def test_intervals_never_narrow_as_the_count_goes_to_0_or_1() -> None:
    # the former fallback gave 0.99 [0.97, 1.00] but 1.00 [0.78, 1.00]: both ends must rise with the count
    previous = seed_interval([0.0] * 5)
    for total in np.linspace(0.01, 5.0, 500):
        fractions = [total / 5] * 5
        current = seed_interval(fractions)
        assert current.low >= previous.low - 1e-12 and current.high >= previous.high - 1e-12, total
        assert current.low <= current.value <= current.high
        previous = current
    # the test against a level agrees with the interval: the interval excludes 0.1 exactly when p < 0.05
    for total in np.linspace(0.0, 5.0, 101):
        fractions = [total / 5] * 5
        interval, p = seed_interval(fractions), versus_level(fractions, 0.1)
        assert (p < 0.05) == (interval.low > 0.1 or interval.high < 0.1), total


def test_sign_flip_over_five_seeds_cannot_go_below_0_0625() -> None:
    # five seeds, all differences of one sign: only the all-plus and all-minus flips reach |mean|: 2/32
    five = sign_flip(np.array([-0.2, -0.1, -0.3, -0.1, -0.2]))
    assert five.p_value == pytest.approx(0.0625)
    assert (five.low, five.high) == (-1.0, 1.0)  # no shift can be rejected at 0.05: the whole range
    assert minimum_detectable(np.array([-0.2, -0.1, -0.3, -0.1, -0.2]), 0.05) == float("inf")
    # seven seeds: p = 2/128, and the inverted interval is the shifts that keep some sign mixed
    seven = sign_flip(np.array([-0.1, -0.2, -0.3, -0.1, -0.2, -0.3, -0.2]))
    assert seven.p_value == pytest.approx(2 / 128)
    assert (seven.low, seven.high) == (pytest.approx(-0.3, abs=1e-3), pytest.approx(-0.1, abs=1e-3))
    assert sign_flip_p(np.zeros(5)) == 1.0
    d = np.array([0.5, -0.25, 1.0, 0.75, 0.1])
    flips = [abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product([-1, 1], repeat=5)]
    assert sign_flip_p(d) == pytest.approx(np.mean(flips))
    rng = np.random.default_rng(0)
    assert sign_flip_p(rng.normal(0.5, 0.2, 40)) < 0.001  # Monte Carlo beyond 16 seeds
    assert sign_flip_p(rng.normal(0.0, 1.0, 40)) > 0.01


def test_holm_and_the_seeds_that_make_significance_reachable() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, float("nan")])[0] == 0.2
    assert seeds_for_significance(1, 0.05) == 6  # 2/64 < 0.05 <= 2/32
    assert seeds_for_significance(8, 0.05) == 9  # 2/512 < 0.05/8 = 0.00625 <= 2/256


def test_seven_seeds_detect_a_shift_of_about_their_spread() -> None:
    d = np.array([-0.1, -0.2, -0.3, -0.1, -0.2, -0.3, -0.2])
    detectable = minimum_detectable(d, 0.05)
    # centred differences lie in [-0.1, 0.1]: above 0.1 every sign agrees and p = 2/128 < 0.05
    assert 0.0 < detectable <= 0.105
    assert t_comparison(np.array([0.01, 0.02, 0.03])).p_value == pytest.approx(
        scipy_stats.ttest_1samp([0.01, 0.02, 0.03], 0.0).pvalue
    )


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


def _rows(
    arm: str, policy: str, recovered: list[int], size: int = 2, attack: str = "ce-demix"
) -> list[dict[str, object]]:
    """One audited update per seed (client 7), ``recovered`` of ``size`` samples."""
    return [
        {
            "arm": arm,
            "seed": seed,
            "stage": "initial",
            "stage_round": 0,
            "stage_accuracy": 0.1,
            "policy": policy,
            "batch_size": size,
            "client": 7,
            "samples": size,
            "realised_batch": size,
            "recovered": hits,
            f"recovered[{attack}]": hits,
            "ssim": 0.95 if hits else 0.6,
            "ssim_baseline": 0.4,
        }
        for seed, hits in enumerate(recovered)
    ]


def _spec(seeds: int) -> StudySpec:
    arm = {"setting": "s", "rounds": 1, "evaluate_every": 1, "lr_grid": [0.1]}
    return StudySpec.model_validate(
        {
            "name": "t",
            "seeds": list(range(seeds)),
            "tuning_seeds": [100],
            "dataset": {"name": "mnist-5k"},
            "tracking": {},
            "baseline": "random-ce",
            "policies": {
                "random-ce": {"batching": "random", "loss": "cross-entropy"},
                "same": {"batching": "identical-labels", "loss": "cross-entropy"},
            },
            "settings": {
                "s": {
                    "algorithm": {"name": "fedsgd"},
                    "partition": {},
                    "clients": 10,
                    "clients_per_round": 5,
                    "batch_size": 2,
                }
            },
            "arms": [
                {**arm, "model": {"name": "mlp"}, "attacks": ["dense-ratio"]},
                {**arm, "model": {"name": "lenet"}, "attacks": ["inverting-gradients"]},
                {**arm, "model": {"name": "softmax"}, "attacks": ["ce-demix"]},
            ],
            "audit": {"batch_sizes": [2], "clients": 1},
        }
    )


def _verdict(verdicts: list[object], claim: str, era: str = "to date") -> str:
    return next(v.verdict for v in verdicts if v.claim == claim and v.era == era and v.primary)  # type: ignore[attr-defined]


@pytest.mark.parametrize("seeds", [5, 7])
def test_claims_read_metadata_and_need_the_seeds(seeds: int) -> None:
    # arm labels as the spec builds them; the rules read the model block and the policy's batching, not names
    mlp, lenet, softmax = "mlp/s", "lenet/s", "softmax/s"
    audits = [
        *_rows(mlp, "random-ce", [2] * seeds, attack="dense-ratio"),  # dense layer, every seed recovered
        *_rows(mlp, "same", [2] * seeds, attack="dense-ratio"),
        *_rows(lenet, "random-ce", [2] * seeds, attack="inverting-gradients"),
        *_rows(lenet, "same", [0] * seeds, attack="inverting-gradients"),  # identical labels: nothing, every seed
        *_rows(softmax, "random-ce", [2] * seeds),
        *_rows(softmax, "same", [2] * seeds),
    ]
    cells = build_cells(audits, [], "random-ce")
    verdicts = judge(cells, _spec(seeds), [])
    # claim 1: every seed recovers everything from a dense layer: the interval [0.48, 1] lies above 0.1
    assert _verdict(verdicts, "dense") == REFUTED
    # claim 3: ce-demix is of the later era: not tested in the paper's, supported to date
    assert _verdict(verdicts, "demix") == SUPPORTED and _verdict(verdicts, "demix", "paper") == "not tested"
    # claim 6: LeNet leaks 1.0 under the baseline and 0 under identical labels on every seed; with 5 seeds the
    # exact sign flip cannot go below 0.0625, so this is inconclusive (never refuted); with 7 it is supported
    assert _verdict(verdicts, "lenet") == (INCONCLUSIVE if seeds == 5 else SUPPORTED)
    lenet_cell = next(c for c in cells if c.arm == lenet and c.policy == "same")
    assert lenet_cell.versus_baseline is not None
    assert lenet_cell.versus_baseline.p_value == pytest.approx(2 / 2**seeds)
    # the graded ladder: SSIM 0.95 above the baseline's 0.4 counts at 0.7 and 0.5 as well
    mlp_cell = next(c for c in cells if c.arm == mlp and c.policy == "random-ce")
    assert mlp_cell.intervals[("to date", "ssim_ge_0.5")].value == 1.0


def test_a_lenet_whose_baseline_does_not_leak_neither_supports_nor_refutes_claim_6() -> None:
    """Nothing leaks under the baseline: a zero difference says nothing about the defence's use (not tested); where
    the baseline leaks on every seed and identical labels leak nothing, 10 seeds support the claim."""
    lenet = "lenet/s"
    quiet = [*_rows(lenet, "random-ce", [0] * 10, attack="inverting-gradients")]
    quiet += _rows(lenet, "same", [0] * 10, attack="inverting-gradients")
    verdicts = judge(build_cells(quiet, [], "random-ce"), _spec(10), [])
    assert _verdict(verdicts, "lenet") == "not tested" and _verdict(verdicts, "lenet", "paper") == "not tested"
    leaking = [*_rows(lenet, "random-ce", [2] * 10, attack="inverting-gradients")]
    leaking += _rows(lenet, "same", [0] * 10, attack="inverting-gradients")
    verdicts = judge(build_cells(leaking, [], "random-ce"), _spec(10), [])
    assert _verdict(verdicts, "lenet") == SUPPORTED


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


def test_graded_columns_use_per_sample_ssims_when_the_table_has_them() -> None:
    row = _rows("mlp/s", "random-ce", [0])[0]
    # sample 1 beats its baseline (0.95 > 0.4); sample 2 does not (0.6 < 0.7): half the samples at SSIM >= 0.5
    row.update({"ssim_samples": "[0.95, 0.6]", "ssim_baseline_samples": "[0.4, 0.7]"})
    cell = build_cells([row], [], "random-ce")[0]
    assert cell.intervals[("to date", "ssim_ge_0.5")].value == 0.5
    assert cell.intervals[("to date", "ssim_ge_0.7")].value == 0.5
    assert cell.ssim_quartiles[1] == pytest.approx(0.775)  # the median of the best SSIMs
    # without them, each sample gets its update's mean SSIM (0.6 here, above the mean baseline 0.4)
    del row["ssim_samples"], row["ssim_baseline_samples"]
    assert build_cells([row], [], "random-ce")[0].intervals[("to date", "ssim_ge_0.5")].value == 1.0
