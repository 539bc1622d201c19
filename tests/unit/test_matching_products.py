"""Scores by matrix products equal the pair-by-pair metrics, and the assignments equal the old path's.

Tolerances, from the arithmetic of each score (float64 throughout):

- AVD: absolute 1e-6. Scores are O(1) (at most about 3.5 for clipped images). Quantised images are whole
  numbers of 8-bit levels, so their variation maps are integers and norms-plus-product sums are exact:
  identical images give exactly 0. Unquantised maps leave a few round-offs of the squared norms (about
  1e-15), which the square root turns into at most about 1e-7 near 0, still inside 1e-6.
- MSE: absolute 1e-6 (values are at most 1 after clipping). The matrix has a cancellation error of a few
  round-offs of the squared norms (about 1e-15); matched pairs are scored from the pixel differences.
- PSNR: relative 1e-6. Values reach 100 dB, and d PSNR = 4.34 d MSE / MSE magnifies the MSE's absolute
  round-off near the 1e-10 floor to about 1e-5 dB in absolute terms, but not in relative terms.
- SSIM: absolute 1e-6 (values in [-1, 1]); window sums and the sample variances in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from metrics import (
    METRIC_NAMES,
    UNMATCHED,
    avd,
    baseline_scores,
    first_order_map,
    match,
    match_many,
    mse,
    pairwise_avd,
    pairwise_mse,
    pairwise_psnr,
    psnr,
    second_order_map,
    ssim,
)
from metrics.avd import prepare_original, prepare_reconstruction, variation_features
from metrics.matching import solver_costs
from metrics.products import pixel_major, squared_distances, window_sums
from metrics.similarity import ssim_pixel_major

ONE_PAIR = {"avd": avd, "mse": mse, "psnr": psnr, "ssim": ssim}
ABSOLUTE = {"avd": 1e-6, "mse": 1e-6, "ssim": 1e-6}
RELATIVE = {"psnr": 1e-6}
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist_reconstructions.npz"


def _assert_close(metric: str, got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(got[~finite], expected[~finite])
    np.testing.assert_allclose(
        got[finite], expected[finite], rtol=RELATIVE.get(metric, 0.0), atol=ABSOLUTE.get(metric, 0.0)
    )


def _images(rng: np.random.Generator, count: int, shape: tuple[int, ...], *, eight_bit: bool) -> np.ndarray:
    """Smooth blobs plus texture; 8-bit images are float32 multiples of 1/255, as the data sets store them."""
    height, width = shape[-2:]
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    images = np.empty((count, *shape))
    for k in range(count):
        centre = rng.uniform(0, [height, width])
        blob = np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) / (2 * rng.uniform(1, 4) ** 2))
        images[k] = np.clip(blob + rng.uniform(0, 0.3, size=shape), 0, 1)
    return (np.floor(255 * images) / 255).astype(np.float32) if eight_bit else images


def _reconstructions(rng: np.random.Generator, originals: np.ndarray, count: int) -> np.ndarray:
    """Noisy copies of some originals in a shuffled order, exact copies, decoys and one unrecoverable image."""
    picks = rng.choice(len(originals), size=count, replace=count > len(originals))
    noisy = originals[picks] + rng.normal(0.0, 0.15, size=(count, *originals.shape[1:]))  # outside [0, 1] too
    noisy[0] = originals[picks[0]]  # an exact copy
    noisy[-1] = rng.uniform(-0.5, 1.5, size=originals.shape[1:])  # a decoy
    if count > 2:
        noisy[1, ..., 0, 0] = math.nan
    return noisy.astype(originals.dtype)


def _one_pair_matrix(metric: str, originals: np.ndarray, reconstructions: np.ndarray, **kwargs: bool) -> np.ndarray:
    return np.array([[ONE_PAIR[metric](a, b, **kwargs) for b in reconstructions] for a in originals])


CASES = [  # (originals, reconstructions, image shape, 8-bit originals)
    (6, 6, (1, 28, 28), True),
    (5, 3, (1, 28, 28), True),  # fewer reconstructions than originals
    (3, 7, (3, 8, 8), False),  # more, with channels
    (4, 4, (1, 5, 6), False),  # a window smaller than 7
]


@pytest.mark.parametrize(("n", "k", "shape", "eight_bit"), CASES)
@pytest.mark.parametrize("quantize", [True, False])
def test_avd_matrix_equals_pair_by_pair(
    n: int, k: int, shape: tuple[int, ...], eight_bit: bool, quantize: bool
) -> None:
    rng = np.random.default_rng(n * 10 + k)
    originals = _images(rng, n, shape, eight_bit=eight_bit)
    reconstructions = _reconstructions(rng, originals, k)
    got = pairwise_avd(originals, reconstructions, quantize=quantize)
    expected = _one_pair_matrix("avd", originals, reconstructions, quantize=quantize)
    assert got.shape == (n, k)
    _assert_close("avd", got, expected)
    assert np.isinf(got[:, 1]).all() == (k > 2)
    copy_of = int(np.flatnonzero([np.array_equal(o, reconstructions[0]) for o in originals])[0])
    assert got[copy_of, 0] == (0.0 if quantize else pytest.approx(0.0, abs=1e-6))


@pytest.mark.parametrize(("n", "k", "shape", "eight_bit"), CASES)
def test_mse_and_psnr_matrices_equal_pair_by_pair(n: int, k: int, shape: tuple[int, ...], eight_bit: bool) -> None:
    rng = np.random.default_rng(n * 10 + k + 1)
    originals = _images(rng, n, shape, eight_bit=eight_bit)
    reconstructions = _reconstructions(rng, originals, k)
    errors = pairwise_mse(originals, reconstructions)
    _assert_close("mse", errors, _one_pair_matrix("mse", originals, reconstructions))
    _assert_close(
        "psnr", pairwise_psnr(originals, reconstructions), _one_pair_matrix("psnr", originals, reconstructions)
    )
    copy_of = int(np.flatnonzero([np.array_equal(o, reconstructions[0]) for o in originals])[0])
    assert 0.0 <= errors[copy_of, 0] <= 1e-12  # identical images: 0 up to the cancellation of the norms
    assert pairwise_psnr(originals, reconstructions)[copy_of, 0] == 100.0


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 8), (1, 5, 6), (2, 3, 4)])
def test_ssim_from_window_sums_equals_scikit_image(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    originals = _images(rng, 6, shape, eight_bit=True).astype(np.float64)
    reconstructions = np.clip(originals + rng.normal(0.0, 0.2, size=originals.shape), 0, 1)
    reconstructions[1] = originals[1]
    reconstructions[2] = 0.3  # a flat image: the variances vanish, C2 alone keeps SSIM defined
    got = ssim_pixel_major(pixel_major(originals), pixel_major(reconstructions))
    window = min(7, shape[1], shape[2]) - (1 - min(7, shape[1], shape[2]) % 2)
    expected = np.array(
        [
            structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=window)
            for a, b in zip(originals, reconstructions, strict=True)
        ]
    )
    _assert_close("ssim", got, expected)
    assert got[1] == 1.0


def test_variation_features_are_the_avd_maps_in_levels() -> None:
    rng = np.random.default_rng(4)
    images = rng.uniform(-0.3, 1.3, size=(5, 2, 9, 7))
    for reconstruction, prepare in ((False, prepare_original), (True, prepare_reconstruction)):
        prepared = prepare(images)
        g, h = variation_features(pixel_major(images), reconstruction=reconstruction)
        assert np.array_equal(g, np.round(g)) and np.array_equal(h, np.round(h))  # whole numbers of levels
        expected_g = first_order_map(prepared).transpose(2, 3, 1, 0).reshape(-1, 5)
        expected_h = second_order_map(prepared).transpose(2, 3, 1, 0).reshape(-1, 5)
        np.testing.assert_allclose(g / 255, expected_g, rtol=0, atol=1e-13)
        np.testing.assert_allclose(h / 255, expected_h, rtol=0, atol=1e-13)


def test_norms_plus_product_is_exact_for_integers_and_window_sums_are_box_sums() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 1021, size=(676, 7)).astype(np.float64)
    b = rng.integers(0, 1021, size=(676, 4)).astype(np.float64)
    b[:, 2] = a[:, 3]
    expected = ((a[:, :, None] - b[:, None, :]) ** 2).sum(axis=0)
    assert np.array_equal(squared_distances(a, b), expected)
    assert squared_distances(a, b)[3, 2] == 0.0
    images = rng.random((9, 8, 2, 3))
    for window in (1, 2, 3, 5, 7):
        brute = np.array(
            [
                [images[i : i + window, j : j + window].sum(axis=(0, 1)) for j in range(8 - window + 1)]
                for i in range(9 - window + 1)
            ]
        )
        np.testing.assert_allclose(window_sums(images, window), brute, rtol=0, atol=1e-13)


def _old_assignment(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """The assignment of the pair-by-pair path: AVD matrix from ``avd`` calls, then the Hungarian method."""
    assignment = np.full(len(originals), UNMATCHED)
    if len(originals) and len(reconstructions):
        rows, cols = linear_sum_assignment(solver_costs(_one_pair_matrix("avd", originals, reconstructions), "avd"))
        assignment[rows] = cols
    return assignment


def _check_against_pair_by_pair(batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    results = match_many(batches)
    assert len(results) == len(batches)
    for (originals, reconstructions), result in zip(batches, results, strict=True):
        np.testing.assert_array_equal(result.assignment, _old_assignment(originals, reconstructions))
        np.testing.assert_array_equal(result.assignment, match(originals, reconstructions).assignment)
        matched = result.assignment >= 0
        for name in METRIC_NAMES:
            expected = np.array(
                [ONE_PAIR[name](originals[i], reconstructions[j]) for i, j in enumerate(result.assignment) if j >= 0]
            )
            _assert_close(name, result.scores[name][matched], expected)
            assert (result.scores[name][~matched] == match(originals, reconstructions).scores[name][~matched]).all()


def test_match_many_equals_pair_by_pair_on_random_images() -> None:
    rng = np.random.default_rng(6)
    batches = []
    for n, k in [(8, 8), (6, 4), (4, 9), (3, 0), (5, 5)]:
        originals = _images(rng, n, (1, 28, 28), eight_bit=True)
        reconstructions = _reconstructions(rng, originals, k) if k else np.empty((0, 1, 28, 28), np.float32)
        batches.append((originals, reconstructions))
    batches[4] = (batches[4][0], batches[4][0][::-1].copy())  # identical images, reversed
    _check_against_pair_by_pair(batches)
    identical = match_many(batches)[4]
    np.testing.assert_array_equal(identical.assignment, [4, 3, 2, 1, 0])
    assert (identical.scores["avd"] == 0.0).all() and (identical.scores["mse"] == 0.0).all()
    assert (identical.scores["psnr"] == 100.0).all() and (identical.scores["ssim"] == 1.0).all()


def test_match_many_equals_pair_by_pair_on_real_attack_output() -> None:
    if not DATA.is_file():
        pytest.skip(f"real attack output not found at {DATA} (expected shared/ beside the repository)")
    with np.load(DATA) as archive:
        originals, reconstructions, batch = archive["originals"], archive["reconstructions"], archive["batch"]
    batches = [(originals[batch == b], reconstructions[batch == b]) for b in np.unique(batch)]
    batches += [(originals[batch == b], reconstructions[batch == b][:1]) for b in np.unique(batch)[:40]]  # k < n
    _check_against_pair_by_pair(batches)


def test_baseline_scores_equal_pair_by_pair() -> None:
    rng = np.random.default_rng(7)
    originals = _images(rng, 6, (1, 28, 28), eight_bit=True)
    drawn = {
        "blank": np.zeros_like(originals),
        "class_mean": _images(rng, 6, (1, 28, 28), eight_bit=False).astype(np.float32),
        "class_random": originals[[1, 0, 2, 3, 5, 4]],
    }
    drawn["class_random"][2] = originals[2]
    scores = baseline_scores(originals, drawn)
    assert set(scores) == set(drawn)
    for name, images in drawn.items():
        for metric in METRIC_NAMES:
            expected = np.array([ONE_PAIR[metric](a, b) for a, b in zip(originals, images, strict=True)])
            _assert_close(metric, scores[name][metric], expected)
    assert scores["class_random"]["avd"][2] == 0.0 and scores["class_random"]["mse"][2] == 0.0
    assert baseline_scores(originals, {}) == {}
    empty = baseline_scores(originals[:0], {"blank": originals[:0]})
    assert all(len(values) == 0 for values in empty["blank"].values())
