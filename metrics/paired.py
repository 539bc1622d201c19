"""Scores of aligned pairs (original i with reconstruction i), vectorised over the pairs.

These give the same numbers as ``avd``, ``mse``, ``psnr`` and ``ssim`` called pair by pair (tested),
without a Python call per pair: ``match`` scores all its matched pairs at once, which is what lets an
auditor score thousands of reconstructions per round. SSIM follows scikit-image's
``structural_similarity`` defaults (uniform window, K1 = 0.01, K2 = 0.03, sample covariance, borders
of half a window cropped before the mean, channels averaged).
"""

from __future__ import annotations

import numpy as np

from metrics.avd import (
    first_order_map,
    paired_avd_of_features,
    prepare_original,
    prepare_reconstruction,
    second_order_map,
    variation_features,
)
from metrics.conventions import PSNR_CEILING_DB, WORST_SCORE
from metrics.images import clip_unit
from metrics.products import pixel_major
from metrics.similarity import DATA_RANGE, psnr_of_mse, ssim_pixel_major


def _finite(images: np.ndarray) -> np.ndarray:
    return np.isfinite(images).reshape(len(images), -1).all(axis=1)


def _per_pair_mean(values: np.ndarray) -> np.ndarray:
    return values.reshape(len(values), -1).mean(axis=1)


def paired_avd(v0: np.ndarray, v1: np.ndarray, *, c1: float = 1.0, c2: float = 0.5) -> np.ndarray:
    """AVD of each aligned pair of (N, C, H, W) batches; ``inf`` where the reconstruction is not finite."""
    finite = _finite(v1)
    a = prepare_original(v0)
    b = prepare_reconstruction(np.where(np.isfinite(v1), v1, 0.0))
    first = _per_pair_mean((first_order_map(b) - first_order_map(a)) ** 2)
    second = _per_pair_mean((second_order_map(b) - second_order_map(a)) ** 2)
    return np.where(finite, np.sqrt(c1 * first + c2 * second), WORST_SCORE["avd"])


def paired_mse(v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """MSE of each aligned pair after clipping to [0, 1]; ``inf`` where the reconstruction is not finite."""
    finite = _finite(v1)
    errors = _per_pair_mean((clip_unit(np.where(np.isfinite(v1), v1, 0.0)) - clip_unit(v0)) ** 2)
    return np.where(finite, errors, WORST_SCORE["mse"])


def paired_psnr(v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """PSNR (dB, capped at the ceiling) of each aligned pair; 0 where the reconstruction is not finite."""
    errors = paired_mse(v0, v1)
    floor = 10.0 ** (-PSNR_CEILING_DB / 10.0)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(DATA_RANGE**2 / np.maximum(errors, floor))
    return np.where(np.isfinite(errors), values, WORST_SCORE["psnr"])


def paired_ssim(v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """SSIM of each aligned pair (channels averaged) by ``ssim_pixel_major``; -1 where the reconstruction is
    not finite."""
    finite = _finite(v1)
    x = pixel_major(clip_unit(v0))
    y = pixel_major(clip_unit(np.where(np.isfinite(v1), v1, 0.0)))
    return np.where(finite, ssim_pixel_major(x, y), WORST_SCORE["ssim"])


PAIRED = {"avd": paired_avd, "mse": paired_mse, "psnr": paired_psnr, "ssim": paired_ssim}
"""Vectorised pair scores by metric name."""


def pixel_major_finite(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which images of a pixel-major batch (H, W, C, N) are finite, and the batch with the others zeroed.

    The batch is changed in place. Zeroed images must still be scored as unrecoverable: pass the mask on.
    """
    *pixels, count = images.shape
    finite = np.isfinite(images).reshape(int(np.prod(pixels)), count).all(axis=0)
    if not finite.all():
        images[~np.isfinite(images)] = 0.0
    return images, finite


def scores_of_pairs(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    finite: np.ndarray,
    *,
    avd: np.ndarray | None = None,
    c1: float = 1.0,
    c2: float = 0.5,
) -> dict[str, np.ndarray]:
    """All four scores of the pairs (original ``first[k]``, reconstruction ``second[k]``) of pixel-major batches.

    ``originals`` (H, W, C, N) and ``reconstructions`` (H, W, C, M) are finite, non-finite
    reconstructions already zeroed (``pixel_major_finite``) and flagged False in ``finite`` (M,); their
    pairs get the worst scores. ``avd`` holds the pairs' AVD when already known (read from an AVD
    matrix); otherwise it comes from the variation maps, formed once per image even when an original is
    in several pairs. MSE is the mean squared pixel difference, PSNR is taken from it and SSIM from
    window sums (``metrics.similarity.ssim_pixel_major``), all in float64: equal to the one-pair
    functions up to round-off.
    """
    if len(first) == 0:
        return {name: np.empty(0) for name in PAIRED}
    if avd is None:
        g0, h0 = variation_features(originals, reconstruction=False)
        g1, h1 = variation_features(reconstructions, reconstruction=True)
        avd = paired_avd_of_features(
            np.take(g0, first, axis=1),
            np.take(h0, first, axis=1),
            np.take(g1, second, axis=1),
            np.take(h1, second, axis=1),
            c1=c1,
            c2=c2,
        )
    x = np.take(originals, first, axis=-1)
    y = np.take(reconstructions, second, axis=-1)
    np.clip(x, 0.0, 1.0, out=x)
    np.clip(y, 0.0, 1.0, out=y)
    similarity = ssim_pixel_major(x, y)
    y -= x
    y *= y
    errors = y.reshape(-1, len(first)).mean(axis=0)
    bad = ~finite[second]
    avd = np.where(bad, WORST_SCORE["avd"], avd)
    errors[bad] = WORST_SCORE["mse"]
    similarity[bad] = WORST_SCORE["ssim"]
    return {"avd": avd, "mse": errors, "psnr": psnr_of_mse(errors), "ssim": similarity}
