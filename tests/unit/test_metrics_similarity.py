"""MSE, PSNR and SSIM: pre-processing, worst values, window choice and input conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from metrics import PSNR_CEILING_DB, mse, pairwise_psnr, pairwise_ssim, psnr, ssim
from metrics.similarity import ssim_window


def test_mse_and_psnr_of_a_known_offset() -> None:
    original = np.full((4, 4), 0.2)
    assert mse(original, original + 0.1) == pytest.approx(0.01)
    assert psnr(original, original + 0.1) == pytest.approx(20.0)


def test_reconstruction_is_clipped_to_unit_range() -> None:
    original = np.array([[0.0, 1.0, 0.5]] * 3)
    wild = np.array([[-3.0, 7.0, 0.5]] * 3)
    assert mse(original, wild) == 0.0
    assert psnr(original, wild) == PSNR_CEILING_DB
    assert ssim(original, wild) == pytest.approx(1.0)


def test_identical_images_score_best() -> None:
    image = np.random.default_rng(0).uniform(size=(3, 12, 12))
    assert mse(image, image) == 0.0
    assert psnr(image, image) == 100.0
    assert ssim(image, image) == pytest.approx(1.0)


def test_non_finite_reconstruction_gets_worst_values() -> None:
    image = np.full((6, 6), 0.3)
    broken = image.copy()
    broken[0, 0] = math.nan
    assert mse(image, broken) == math.inf
    assert psnr(image, broken) == 0.0
    assert ssim(image, broken) == -1.0


def test_psnr_of_opposite_binary_images_is_zero() -> None:
    assert psnr(np.zeros((5, 5)), np.ones((5, 5))) == 0.0


def test_ssim_equals_scikit_image_with_documented_settings() -> None:
    rng = np.random.default_rng(1)
    original = rng.uniform(size=(3, 16, 16))
    reconstruction = original + rng.normal(scale=0.1, size=original.shape)
    expected = structural_similarity(
        original, np.clip(reconstruction, 0, 1), data_range=1.0, channel_axis=0, win_size=7
    )
    assert ssim(original, reconstruction) == pytest.approx(expected, rel=1e-12)
    assert 0.3 < expected < 0.95


def test_ssim_of_grey_image_equals_channel_free_call() -> None:
    rng = np.random.default_rng(2)
    original = rng.uniform(size=(9, 9))
    reconstruction = rng.uniform(size=(9, 9))
    expected = structural_similarity(original, reconstruction, data_range=1.0, win_size=7)
    assert ssim(original, reconstruction) == pytest.approx(expected, rel=1e-12)
    assert ssim(original[np.newaxis], reconstruction[np.newaxis]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("height", "width", "window"), [(28, 28, 7), (7, 30, 7), (6, 6, 5), (5, 9, 5), (4, 4, 3)])
def test_ssim_window_fits_small_images(height: int, width: int, window: int) -> None:
    assert ssim_window(height, width) == window


def test_ssim_runs_on_tiny_images() -> None:
    image = np.array([[0.0, 0.5, 1.0], [0.2, 0.4, 0.6], [1.0, 0.0, 0.3]])
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, 1.0 - image) < 0.0


def test_torch_inputs_on_any_dtype_match_numpy() -> None:
    rng = np.random.default_rng(3)
    original, reconstruction = rng.uniform(size=(2, 10, 10))
    as_tensor = torch.from_numpy(reconstruction).to(torch.float32)
    assert mse(original, as_tensor) == pytest.approx(mse(original, reconstruction), rel=1e-6)
    assert ssim(torch.from_numpy(original), as_tensor) == pytest.approx(ssim(original, reconstruction), rel=1e-5)


def test_pairwise_scores_equal_single_pair_scores() -> None:
    rng = np.random.default_rng(4)
    originals = rng.uniform(size=(2, 8, 8))
    reconstructions = rng.uniform(-0.2, 1.2, size=(3, 8, 8))
    reconstructions[2, 4, 4] = math.inf
    psnrs = pairwise_psnr(originals, reconstructions)
    ssims = pairwise_ssim(originals, reconstructions)
    for i in range(2):
        for j in range(3):
            assert psnrs[i, j] == pytest.approx(psnr(originals[i], reconstructions[j]))
            assert ssims[i, j] == pytest.approx(ssim(originals[i], reconstructions[j]))
    assert (psnrs[:, 2] == 0.0).all() and (ssims[:, 2] == -1.0).all()


def test_mismatched_shapes_name_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"got \(1, 5, 5\) and \(5, 5\)"):
        ssim(np.zeros((1, 5, 5)), np.zeros((5, 5)))
