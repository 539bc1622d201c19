"""match: optimal pairing of originals with unordered reconstructions, and the scores it reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics import METRIC_NAMES, UNMATCHED, WORST_SCORE, MatchResult, avd, match, ssim
from metrics.matching import solver_costs


def _digits(count: int, seed: int = 0) -> np.ndarray:
    """Distinct smooth test images: random blobs on a 12 x 12 grid."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12), indexing="ij"), axis=-1)
    images = []
    for _ in range(count):
        centre = rng.uniform(2, 10, size=2)
        width = rng.uniform(1.0, 3.0)
        images.append(np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * width**2)))
    return np.stack(images)


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_permuted_reconstructions_are_matched_back(metric: str) -> None:
    originals = _digits(6)
    rng = np.random.default_rng(1)
    permutation = rng.permutation(6)
    noisy = originals[permutation] + rng.normal(scale=0.02, size=originals.shape)
    result = match(originals, noisy, metric=metric)
    np.testing.assert_array_equal(result.assignment, np.argsort(permutation))
    assert result.metric == metric
    assert set(result.scores) == set(METRIC_NAMES)
    assert (result.scores["ssim"] > 0.8).all() and (result.scores["avd"] < 0.1).all()


def test_scores_are_those_of_the_matched_pairs() -> None:
    originals = _digits(3, seed=2)
    reconstructions = originals[[2, 0, 1]] * 0.8
    result = match(originals, reconstructions)
    for i, j in enumerate(result.assignment):
        assert result.scores["avd"][i] == avd(originals[i], reconstructions[j])
        # one SSIM kernel, its window sums BLAS products whose round-off depends on how many pairs are stacked
        assert result.scores["ssim"][i] == pytest.approx(ssim(originals[i], reconstructions[j]), abs=1e-12)


def test_fewer_reconstructions_leave_worst_scores() -> None:
    originals = _digits(4, seed=3)
    result = match(originals, originals[[3, 1]])
    np.testing.assert_array_equal(result.assignment, [UNMATCHED, 1, UNMATCHED, 0])
    for name in METRIC_NAMES:
        assert result.scores[name][0] == WORST_SCORE[name]
        assert result.scores[name][2] == WORST_SCORE[name]
    assert result.scores["avd"][1] == 0.0 and result.scores["ssim"][3] == pytest.approx(1.0)


def test_extra_reconstructions_are_ignored() -> None:
    originals = _digits(2, seed=4)
    decoys = np.random.default_rng(5).uniform(size=(3, 12, 12))
    reconstructions = np.concatenate([decoys[:2], originals[[1]], decoys[2:], originals[[0]]])
    result = match(originals, reconstructions)
    np.testing.assert_array_equal(result.assignment, [4, 2])
    np.testing.assert_array_equal(result.scores["mse"], [0.0, 0.0])


@pytest.mark.parametrize("empty", [np.empty((0, 12, 12)), np.empty(0), torch.empty(0), []])
def test_no_reconstructions_at_all(empty: object) -> None:
    result = match(_digits(3), empty)
    np.testing.assert_array_equal(result.assignment, [UNMATCHED] * 3)
    assert (result.scores["avd"] == math.inf).all() and (result.scores["psnr"] == 0.0).all()


def test_no_originals_gives_empty_result() -> None:
    result = match(np.empty((0, 12, 12)), _digits(2))
    assert result.n == 0 and result.scores["ssim"].shape == (0,)


def test_swapping_equal_reconstructions_changes_no_score() -> None:
    originals = _digits(3, seed=6)
    shared = originals[0] * 0.5
    first = match(originals, np.stack([shared, originals[1], shared]))
    second = match(originals, np.stack([shared, originals[1], shared])[[2, 1, 0]])
    for name in METRIC_NAMES:
        np.testing.assert_array_equal(first.scores[name], second.scores[name])


def test_unrecoverable_reconstruction_goes_to_the_leftover_original() -> None:
    originals = _digits(3, seed=7)
    broken = originals[1].copy()
    broken[0, 0] = math.nan
    reconstructions = np.stack([originals[2], broken, originals[0]])
    result = match(originals, reconstructions)
    np.testing.assert_array_equal(result.assignment, [2, 1, 0])
    assert result.scores["avd"][1] == math.inf and result.scores["ssim"][1] == -1.0
    np.testing.assert_array_equal(result.scores["avd"][[0, 2]], [0.0, 0.0])


def test_maximised_metrics_pick_the_most_similar() -> None:
    originals = _digits(2, seed=8)
    scores = np.array([[0.9, 0.1], [0.8, 0.2]])
    np.testing.assert_array_equal(solver_costs(scores, "ssim"), -scores)
    np.testing.assert_array_equal(solver_costs(scores, "avd"), scores)
    close = originals + 0.01
    far = np.clip(originals + np.random.default_rng(9).normal(scale=0.3, size=originals.shape), 0, 1)
    for metric in ("ssim", "psnr"):
        result = match(originals, np.stack([far[1], close[0]]), metric=metric)
        np.testing.assert_array_equal(result.assignment, [1, 0])


def test_non_finite_costs_become_large_finite_costs() -> None:
    costs = solver_costs(np.array([[0.5, math.inf], [-2.0, math.nan]]), "avd")
    np.testing.assert_array_equal(costs, [[0.5, 5.0], [-2.0, 5.0]])


def test_channel_images_and_tensors_are_accepted() -> None:
    originals = np.stack([_digits(2, seed=10), _digits(2, seed=11)], axis=1)
    result = match(torch.from_numpy(originals), torch.from_numpy(originals[::-1].copy()))
    np.testing.assert_array_equal(result.assignment, [1, 0])
    assert isinstance(result, MatchResult)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="metric must be one of avd, mse, psnr, ssim; got 'l2'"):
        match(_digits(2), _digits(2), metric="l2")
    with pytest.raises(ValueError, match=r"same shape, got \(1, 12, 12\) and \(1, 10, 10\)"):
        match(_digits(2), np.zeros((2, 10, 10)))
    with pytest.raises(ValueError, match="originals: expected a batch"):
        match(np.zeros((12, 12)), np.zeros((12, 12)))


def test_match_many_equals_match_batch_by_batch() -> None:
    from metrics import match_many

    rng = np.random.default_rng(7)
    batches = []
    for n, m in [(4, 4), (5, 3), (3, 6), (2, 0), (4, 4)]:
        originals = rng.random((n, 1, 9, 9))
        reconstructions = rng.random((m, 1, 9, 9))
        reconstructions[: min(n, m)] = originals[::-1][: min(n, m)] + rng.normal(0, 0.05, (min(n, m), 1, 9, 9))
        batches.append((originals, reconstructions))
    batches[4][1][0, 0, 0, 0] = np.inf  # one unrecoverable reconstruction
    many = match_many(batches)
    assert len(many) == len(batches)
    for (originals, reconstructions), got in zip(batches, many, strict=True):
        expected = match(originals, reconstructions, metric="avd")
        np.testing.assert_array_equal(got.assignment, expected.assignment)
        for name in expected.scores:
            np.testing.assert_allclose(got.scores[name], expected.scores[name], rtol=1e-12)
    assert (many[0].assignment == [3, 2, 1, 0]).all()  # the reversed copies were found
    assert (many[3].assignment == -1).all()
