"""recovered, summarize, LeakageSummary.as_metrics, label_accuracy and accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics import (
    DEFAULT_AVD_THRESHOLD,
    LeakageSummary,
    MatchResult,
    accuracy,
    label_accuracy,
    recovered,
    summarize,
)


def _result(avd: list[float], ssim: list[float]) -> MatchResult:
    avd_array = np.array(avd)
    finite = np.isfinite(avd_array)
    mse = np.where(finite, avd_array / 10, math.inf)
    psnr = np.where(finite, -10 * np.log10(np.maximum(mse, 1e-10)), 0.0)
    assignment = np.where(finite, np.arange(len(avd)), -1)
    return MatchResult(
        assignment=assignment, scores={"avd": avd_array, "mse": mse, "psnr": psnr, "ssim": np.array(ssim)}
    )


def test_recovered_by_either_threshold() -> None:
    scores = {"ssim": np.array([0.95, 0.5, 0.5, 0.9, -1.0]), "avd": np.array([0.5, 0.01, 0.5, 0.5, math.inf])}
    np.testing.assert_array_equal(recovered(scores), [True, True, False, True, False])
    np.testing.assert_array_equal(recovered(scores, ssim_threshold=0.99, avd_threshold=0.6), [1, 1, 1, 1, 0])


def test_default_avd_threshold_is_the_calibrated_value() -> None:
    assert DEFAULT_AVD_THRESHOLD == 0.02
    scores = {"ssim": np.zeros(2), "avd": np.array([0.02, 0.0201])}
    np.testing.assert_array_equal(recovered(scores), [True, False])


def test_recovered_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scores must hold a 'avd' array"):
        recovered({"ssim": np.zeros(2)})
    with pytest.raises(ValueError, match="must have the same shape"):
        recovered({"ssim": np.zeros(2), "avd": np.zeros(3)})
    with pytest.raises(ValueError, match="avd_threshold must be a finite number"):
        recovered({"ssim": np.zeros(2), "avd": np.zeros(2)}, avd_threshold=math.nan)


def test_summary_statistics_skip_unrecoverable_samples() -> None:
    result = _result([0.0, 0.2, 1.0, math.inf], [1.0, 0.7, 0.1, -1.0])
    summary = summarize(result)
    assert summary.n == 4
    assert summary.mean["avd"] == pytest.approx(0.4)
    assert summary.median["avd"] == pytest.approx(0.2)
    assert summary.mean["ssim"] == pytest.approx(0.6)
    assert summary.mean["mse"] == pytest.approx(0.04)
    assert summary.median["psnr"] == pytest.approx(10 * math.log10(50))
    assert summary.unrecoverable == 0.25
    assert summary.recovered_fraction == 0.25
    assert summary.label_accuracy is None


def test_summary_of_only_unrecoverable_samples_has_nan_statistics() -> None:
    summary = summarize(_result([math.inf, math.inf], [-1.0, -1.0]))
    assert math.isnan(summary.mean["avd"]) and math.isnan(summary.median["ssim"])
    assert summary.unrecoverable == 1.0 and summary.recovered_fraction == 0.0
    assert summary.as_metrics("x/") == {"x/n": 2.0, "x/unrecoverable": 1.0, "x/recovered_fraction": 0.0}


def test_summary_of_empty_match() -> None:
    summary = summarize(_result([], []), true_labels=[], inferred_labels=[])
    assert summary.n == 0 and math.isnan(summary.unrecoverable) and summary.label_accuracy is None
    assert summary.as_metrics() == {"n": 0.0}


def test_label_accuracy_in_summary_counts_the_multiset_intersection() -> None:
    result = _result([0.0, 0.5, 0.5, 0.5], [1.0, 0.2, 0.2, 0.2])
    summary = summarize(result, true_labels=[3, 3, 7, 1], inferred_labels=torch.tensor([3, 7, 7, 9]))
    assert summary.label_accuracy == 0.5
    with pytest.raises(ValueError, match=r"true_labels must hold one label per original \(4\)"):
        summarize(result, true_labels=[3, 3], inferred_labels=[3, 3])


def test_label_accuracy_ignores_order_and_extra_labels() -> None:
    assert label_accuracy([1, 1, 3], [3, 1, 7]) == pytest.approx(2 / 3)
    assert label_accuracy(np.array([4, 2]), [2, 4, 4, 4]) == 1.0
    with pytest.raises(ValueError, match="inferred_labels: expected integer class labels"):
        label_accuracy([1, 2], [1.5, 2.0])


def test_as_metrics_names_and_values() -> None:
    summary = summarize(
        _result([0.0, 0.2, math.inf], [1.0, 0.6, -1.0]), true_labels=[1, 2, 3], inferred_labels=[1, 2, 2]
    )
    flat = summary.as_metrics("leak/")
    expected_names = {"leak/n", "leak/unrecoverable", "leak/recovered_fraction", "leak/label_accuracy"}
    for metric in ("avd", "mse", "psnr", "ssim"):
        expected_names |= {f"leak/{metric}_mean", f"leak/{metric}_median"}
    assert set(flat) == expected_names
    assert flat["leak/avd_mean"] == pytest.approx(0.1)
    assert flat["leak/label_accuracy"] == pytest.approx(2 / 3)
    assert flat["leak/unrecoverable"] == pytest.approx(1 / 3)
    assert all(math.isfinite(value) for value in flat.values())


def test_as_metrics_omits_non_finite_entries() -> None:
    summary = LeakageSummary(
        n=1,
        mean={"avd": math.inf, "ssim": 0.5},
        median={"avd": math.nan},
        unrecoverable=0.0,
        recovered_fraction=1.0,
    )
    assert summary.as_metrics() == {
        "n": 1.0,
        "ssim_mean": 0.5,
        "unrecoverable": 0.0,
        "recovered_fraction": 1.0,
    }


def test_accuracy_from_logits_and_predictions() -> None:
    logits = torch.tensor([[2.0, 0.1, 0.3], [0.0, 0.0, 5.0], [1.0, 3.0, 0.0], [0.2, 0.1, 0.0]])
    labels = torch.tensor([0, 2, 0, 0])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([0, 2, 1, 1]), [0, 2, 0, 0]) == 0.5


def test_accuracy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same number of samples, got 2 and 3"):
        accuracy(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"logits \(N, C\) or predictions \(N,\)"):
        accuracy(np.zeros((2, 3, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="need at least one sample"):
        accuracy(np.zeros((0, 3)), np.array([], dtype=int))
