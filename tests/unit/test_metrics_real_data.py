"""All metrics on real, messy gradient-inversion output (shared/data/mnist_reconstructions.npz).

The file holds 398 MNIST originals, what an attack recovered from them (with NaN, negative values and
values above 1) and the batch (of 1, 2 or 4 images) each belongs to. See shared/data/README.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from metrics import (
    DEFAULT_AVD_THRESHOLD,
    METRIC_NAMES,
    MatchResult,
    avd,
    match,
    mse,
    psnr,
    recovered,
    ssim,
    summarize,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist_reconstructions.npz"


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """The arrays of the shared file; the test is skipped when the file is not beside the repository."""
    if not DATA.is_file():
        pytest.skip(f"real attack output not found at {DATA} (expected shared/ beside the repository)")
    with np.load(DATA) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def matched(data: dict[str, np.ndarray]) -> list[MatchResult]:
    """One AVD matching per attacked batch."""
    batches = data["batch"]
    return [match(data["originals"][batches == b], data["reconstructions"][batches == b]) for b in np.unique(batches)]


def _pooled(results: list[MatchResult]) -> MatchResult:
    return MatchResult(
        assignment=np.concatenate([r.assignment for r in results]),
        scores={name: np.concatenate([r.scores[name] for r in results]) for name in METRIC_NAMES},
    )


def test_data_is_as_documented(data: dict[str, np.ndarray]) -> None:
    reconstructions = data["reconstructions"]
    assert data["originals"].shape == reconstructions.shape == (398, 28, 28)
    assert np.isnan(reconstructions).any() and np.nanmin(reconstructions) < 0 and np.nanmax(reconstructions) > 1
    assert len(np.unique(data["batch"])) == 204


@pytest.mark.parametrize("metric", ["mse", "psnr", "ssim"])
def test_every_metric_matches_every_batch(data: dict[str, np.ndarray], metric: str) -> None:
    batches = data["batch"]
    for b in np.unique(batches):
        result = match(data["originals"][batches == b], data["reconstructions"][batches == b], metric=metric)
        assert sorted(result.assignment) == list(range(int(np.sum(batches == b))))
        assert np.isfinite(result.scores["psnr"]).all() and np.isfinite(result.scores["ssim"]).all()


def test_unrecoverable_images_are_exactly_the_non_finite_ones(
    data: dict[str, np.ndarray], matched: list[MatchResult]
) -> None:
    non_finite = int(np.sum(~np.isfinite(data["reconstructions"]).all(axis=(1, 2))))
    scores = _pooled(matched).scores
    assert non_finite == 23
    assert int(np.sum(np.isinf(scores["avd"]))) == non_finite
    assert int(np.sum(np.isinf(scores["mse"]))) == non_finite
    assert int(np.sum(scores["ssim"] == -1.0)) == non_finite


def test_mean_avd_of_matched_pairs(matched: list[MatchResult]) -> None:
    summary = summarize(_pooled(matched))
    assert summary.n == 398
    assert summary.unrecoverable == pytest.approx(23 / 398)
    assert summary.mean["avd"] == pytest.approx(0.6763, abs=1e-3)
    assert summary.median["avd"] == pytest.approx(0.8171, abs=1e-3)
    assert all(math.isfinite(value) for value in summary.as_metrics().values())


def test_uniform_noise_scores_about_one(data: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    values = np.array([avd(image, rng.uniform(size=image.shape)) for image in data["originals"]])
    assert 0.93 < values.mean() < 1.03
    assert 0.7 < values.min() and values.max() < 1.5


def test_copies_beat_real_single_image_reconstructions_which_beat_noise(
    data: dict[str, np.ndarray], matched: list[MatchResult]
) -> None:
    singles = [r for r in matched if r.n == 1]
    ids, counts = np.unique(data["batch"], return_counts=True)
    originals = data["originals"][np.isin(data["batch"], ids[counts == 1])]
    assert len(singles) == len(originals) == 90
    real = summarize(_pooled(singles)).mean
    rng = np.random.default_rng(1)
    noise: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    copy: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for image in originals:
        random_image = rng.uniform(size=image.shape)
        for name, score in (("avd", avd), ("mse", mse), ("psnr", psnr), ("ssim", ssim)):
            noise[name].append(score(image, random_image))
            copy[name].append(score(image, image))
    assert np.all(np.array(copy["avd"]) == 0.0) and np.allclose(copy["ssim"], 1.0)
    for name in ("avd", "mse"):
        assert np.mean(copy[name]) < real[name] < np.mean(noise[name])
    for name in ("psnr", "ssim"):
        assert np.mean(copy[name]) > real[name] > np.mean(noise[name])
    assert real["avd"] < 0.1 < 0.9 < np.mean(noise["avd"])


def test_default_avd_threshold_agrees_with_ssim_criterion(matched: list[MatchResult]) -> None:
    scores = _pooled(matched).scores
    finite = np.isfinite(scores["avd"])
    by_ssim = scores["ssim"][finite] >= 0.9
    by_avd = scores["avd"][finite] <= DEFAULT_AVD_THRESHOLD
    assert np.mean(by_ssim == by_avd) >= 0.95
    assert np.sum(by_avd & by_ssim) / np.sum(by_avd) >= 0.95
    assert 0.18 < np.mean(recovered(scores)) < 0.25
