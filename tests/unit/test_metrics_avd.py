"""AVD: hand-computed maps and values, pre-processing, input conventions and the unrecoverable case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics import avd, first_order_map, pairwise_avd, quantize, second_order_map

# A 3 x 3 image whose maps are worked out by hand below (no quantisation involved).
SMALL = np.array([[0.0, 0.2, 0.4], [0.1, 0.5, 0.3], [0.6, 0.0, 0.8]])
# Dx = [[-.2, -.2], [-.4, .2], [.6, -.8]], Dy = [[-.1, -.3, .1], [-.5, .5, -.5]]
# g = |Dx[1:] + Dy[:, 1:]| = |[[-.7, .3], [1.1, -1.3]]|
SMALL_G = np.array([[0.7, 0.3], [1.1, 1.3]])
# D2x = [[0], [-.6], [1.4]], D2y = [[.4, -.8, .6]]; h = |D2x[2:] + D2y[:, 2:]| = |1.4 + .6|
SMALL_H = np.array([[2.0]])
# Against a black original: sqrt(mean(g^2) + 0.5 * mean(h^2)) = sqrt(3.48 / 4 + 0.5 * 4)
SMALL_AVD = math.sqrt(2.87)

# A 4 x 4 reconstruction exercising |.|, clipping and 8-bit flooring.
RAW = np.array(
    [
        [0.5, -0.3, 0.0, 0.0],
        [0.0, 1.7, 0.0, 0.25],
        [0.0, 0.0, 0.999, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
# floor(255 * clip(|v|)): 0.5 -> 127, 0.3 -> 76, 1.7 -> 255, 0.25 -> 63, 0.999 -> 254
RAW_LEVELS = np.array([[127, 76, 0, 0], [0, 255, 0, 63], [0, 0, 254, 0], [0, 0, 0, 0]])
# g and h of the quantised image, in units of 1/255, computed by hand from RAW_LEVELS
RAW_G = np.array([[434, 255, 126], [255, 508, 317], [0, 254, 0]])
RAW_H = np.array([[508, 634], [508, 63]])


def test_maps_of_small_image_match_hand_computation() -> None:
    np.testing.assert_allclose(first_order_map(SMALL), SMALL_G, atol=1e-12)
    np.testing.assert_allclose(second_order_map(SMALL), SMALL_H, atol=1e-12)


def test_small_image_against_black_without_quantisation() -> None:
    assert avd(np.zeros((3, 3)), SMALL, quantize=False) == pytest.approx(SMALL_AVD, rel=1e-12)


def test_weights_scale_the_two_terms() -> None:
    black = np.zeros((3, 3))
    assert avd(black, SMALL, quantize=False, c2=0.0) == pytest.approx(math.sqrt(0.87))
    assert avd(black, SMALL, quantize=False, c1=0.0, c2=1.0) == pytest.approx(2.0)


def test_quantised_maps_match_hand_computation() -> None:
    levels = quantize(np.clip(np.abs(RAW), 0.0, 1.0)) * 255
    np.testing.assert_allclose(levels, RAW_LEVELS, atol=1e-9)
    np.testing.assert_allclose(first_order_map(RAW_LEVELS / 255) * 255, RAW_G, atol=1e-9)
    np.testing.assert_allclose(second_order_map(RAW_LEVELS / 255) * 255, RAW_H, atol=1e-9)


def test_quantised_avd_against_black() -> None:
    # sqrt(757351 / 9 + 0.5 * 922053 / 4) / 255, the sums of squares of RAW_G and RAW_H
    expected = math.sqrt(757351 / 9 + 0.5 * 922053 / 4) / 255
    assert expected == pytest.approx(1.75118, abs=1e-5)
    assert avd(np.zeros((4, 4)), RAW) == pytest.approx(expected, rel=1e-12)


def test_quantisation_flag_changes_the_value() -> None:
    unquantised = avd(np.zeros((4, 4)), RAW, quantize=False)
    assert unquantised == pytest.approx(avd(np.zeros((4, 4)), np.clip(np.abs(RAW), 0, 1), quantize=False))
    assert unquantised != pytest.approx(avd(np.zeros((4, 4)), RAW), rel=1e-6)


def test_copy_scores_zero_and_sign_of_reconstruction_is_ignored() -> None:
    image = np.random.default_rng(0).uniform(size=(8, 9))
    assert avd(image, image) == 0.0
    assert avd(image, -image) == 0.0
    noisy = image + np.random.default_rng(1).normal(scale=0.2, size=image.shape)
    assert avd(image, -noisy) == avd(image, noisy) > 0.05


def test_channels_pool_all_pixels() -> None:
    rng = np.random.default_rng(2)
    original, reconstruction = rng.uniform(size=(2, 3, 6, 7))
    per_channel = [avd(original[c], reconstruction[c]) for c in range(3)]
    pooled = avd(original, reconstruction)
    assert pooled == pytest.approx(math.sqrt(np.mean(np.square(per_channel))), rel=1e-12)
    assert min(per_channel) < pooled < max(per_channel)


def test_non_finite_reconstruction_is_unrecoverable() -> None:
    image = np.full((5, 5), 0.5)
    for bad in (math.nan, math.inf, -math.inf):
        broken = image.copy()
        broken[2, 3] = bad
        assert avd(image, broken) == math.inf


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(3)
    original, reconstruction = rng.uniform(-0.2, 1.2, size=(2, 3, 10, 10)).astype(np.float32)
    from_numpy = avd(original, reconstruction)
    from_torch = avd(torch.from_numpy(original), torch.from_numpy(reconstruction).requires_grad_())
    assert from_torch == from_numpy
    assert from_numpy > 0.1


def test_pairwise_matrix_equals_single_pair_values() -> None:
    rng = np.random.default_rng(4)
    originals = rng.uniform(size=(3, 2, 6, 6))
    reconstructions = rng.uniform(-0.5, 1.5, size=(4, 2, 6, 6))
    reconstructions[1, 0, 0, 0] = math.nan
    matrix = pairwise_avd(originals, reconstructions)
    assert matrix.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert matrix[i, j] == pytest.approx(avd(originals[i], reconstructions[j]), rel=1e-12)
    assert np.isinf(matrix[:, 1]).all()


@pytest.mark.parametrize(
    ("original", "reconstruction", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), r"same shape, got \(4, 4\) and \(4, 5\)"),
        (np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4)), r"H x W or C x H x W, got shape \(2, 2, 4, 4\)"),
        (np.zeros(16), np.zeros(16), r"got shape \(16,\)"),
        (np.zeros((2, 5)), np.zeros((2, 5)), "at least 3"),
        (np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4)), "floating-point values"),
        (np.full((4, 4), math.nan), np.zeros((4, 4)), "original: must hold only finite values"),
    ],
)
def test_bad_inputs_raise_one_line_errors(original: np.ndarray, reconstruction: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        avd(original, reconstruction)


def test_negative_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match="c2 must be a finite number >= 0"):
        avd(np.zeros((4, 4)), np.zeros((4, 4)), c2=-1.0)
