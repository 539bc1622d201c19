"""Pixel-space scores between an original and a reconstruction: MSE, PSNR and SSIM.

Pre-processing: both images are clipped to [0, 1] (the original normally already is; the
reconstruction of an attack often is not). There is no absolute value and no quantisation here;
those belong to AVD only. A reconstruction holding NaN or infinity gets the worst score listed in
``metrics.conventions.WORST_SCORE``: MSE ``inf``, PSNR ``0.0``, SSIM ``-1.0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from metrics.conventions import PSNR_CEILING_DB, WORST_SCORE
from metrics.images import as_batch_pair, as_image_pair, clip_unit, is_finite_image
from metrics.products import pixel_major, squared_distances, window_sums

DATA_RANGE = 1.0
"""The intensity range used by PSNR and SSIM."""

SSIM_WINDOW = 7
"""The SSIM window side for images of at least 7 x 7 pixels."""

SSIM_K1, SSIM_K2 = 0.01, 0.03
"""SSIM's stabilising constants (scikit-image's defaults): C1 = (K1 L)^2 and C2 = (K2 L)^2 for data range L."""

PAIRS_PER_BLOCK = 256
"""Pairs ``pairwise_ssim`` stacks per call of the kernel."""

_MSE_FLOOR = 10.0 ** (-PSNR_CEILING_DB / 10.0)


def ssim_window(height: int, width: int) -> int:
    """SSIM window side for an image: 7, or the largest odd number that fits a smaller image."""
    side = min(SSIM_WINDOW, height, width)
    return side if side % 2 == 1 else side - 1


def _mse(v0: np.ndarray, v1: np.ndarray) -> float:
    return float(np.mean((clip_unit(v1) - clip_unit(v0)) ** 2))


def _psnr_from_mse(error: float) -> float:
    if not math.isfinite(error):
        return WORST_SCORE["psnr"]
    return float(10.0 * math.log10(DATA_RANGE**2 / max(error, _MSE_FLOOR)))


def _ssim(v0: np.ndarray, v1: np.ndarray) -> float:
    """SSIM of one finite pair (C x H x W) by the window-sums kernel, ``ssim_pixel_major``."""
    x = np.ascontiguousarray(clip_unit(v0).transpose(1, 2, 0)[..., np.newaxis], dtype=np.float64)
    y = np.ascontiguousarray(clip_unit(v1).transpose(1, 2, 0)[..., np.newaxis], dtype=np.float64)
    return float(ssim_pixel_major(x, y)[0])


def mse(original: Any, reconstruction: Any) -> float:
    """Mean squared error over all channels and pixels, after clipping both images to [0, 1].

    Inputs are numpy arrays or torch tensors of shape H x W or C x H x W. A non-finite
    reconstruction scores ``inf``.
    """
    v0, v1 = as_image_pair(original, reconstruction)
    return _mse(v0, v1) if is_finite_image(v1) else WORST_SCORE["mse"]


def psnr(original: Any, reconstruction: Any) -> float:
    """Peak signal-to-noise ratio in dB for data range 1.0, after clipping both images to [0, 1].

    PSNR = 10 log10(1 / MSE), capped at ``PSNR_CEILING_DB`` (100 dB) so identical images stay
    finite. A non-finite reconstruction scores ``0.0``, the lowest value clipped images can reach.
    """
    return _psnr_from_mse(mse(original, reconstruction))


def ssim(original: Any, reconstruction: Any) -> float:
    """Structural similarity (Wang et al. 2004) with data range 1.0, after clipping to [0, 1].

    The statistic of scikit-image's ``structural_similarity`` (its test reference) with a 7 x 7 uniform
    window (the largest odd window that fits for smaller images), computed by ``ssim_pixel_major``; for
    C x H x W the per-channel values are averaged. A non-finite reconstruction scores ``-1.0``.
    """
    v0, v1 = as_image_pair(original, reconstruction)
    return _ssim(v0, v1) if is_finite_image(v1) else WORST_SCORE["ssim"]


def _finite_rows(images: np.ndarray) -> np.ndarray:
    return np.isfinite(images).reshape(len(images), -1).all(axis=1)


def pairwise_mse(originals: Any, reconstructions: Any) -> np.ndarray:
    """N x M matrix of MSE between every original and every reconstruction (``inf`` if non-finite).

    Squared norms plus one matrix product (``metrics.products.squared_distances``), in float64: equal
    to ``mse`` pair by pair up to a few round-offs of the squared norms (below 1e-14 for clipped
    images).
    """
    v0, v1 = as_batch_pair(originals, reconstructions)
    finite = _finite_rows(v1)
    flat0 = clip_unit(v0).reshape(len(v0), -1)
    flat1 = clip_unit(np.where(np.isfinite(v1), v1, 0.0)).reshape(len(v1), -1)
    errors = squared_distances(flat0.T, flat1.T)
    errors /= flat0.shape[1]
    errors[:, ~finite] = WORST_SCORE["mse"]
    return errors


def psnr_of_mse(errors: np.ndarray) -> np.ndarray:
    """PSNR in dB of an array of MSE values: 10 log10(1 / MSE), capped at the ceiling; 0 for ``inf``."""
    errors = np.asarray(errors, dtype=np.float64)
    with np.errstate(divide="ignore"):  # inf errors give -inf here, replaced below
        values = 10.0 * np.log10(DATA_RANGE**2 / np.maximum(errors, _MSE_FLOOR))
    return np.where(np.isfinite(errors), values, WORST_SCORE["psnr"])


def pairwise_psnr(originals: Any, reconstructions: Any) -> np.ndarray:
    """N x M matrix of PSNR in dB between every original and every reconstruction (0 if non-finite)."""
    return psnr_of_mse(pairwise_mse(originals, reconstructions))


def pairwise_ssim(originals: Any, reconstructions: Any) -> np.ndarray:
    """N x M matrix of SSIM between every original and every reconstruction (-1 if non-finite), by the
    window-sums kernel (``ssim_pixel_major``) over all N x M pairs at once."""
    v0, v1 = as_batch_pair(originals, reconstructions)
    finite = _finite_rows(v1)
    x = pixel_major(clip_unit(v0))
    y = pixel_major(clip_unit(np.where(np.isfinite(v1), v1, 0.0)))
    first, second = np.divmod(np.arange(len(v0) * len(v1)), len(v1))
    flat = np.empty(len(first))
    for start in range(0, len(first), PAIRS_PER_BLOCK):  # bounds the stacked copies of the pairs
        block = slice(start, start + PAIRS_PER_BLOCK)
        flat[block] = ssim_pixel_major(np.take(x, first[block], axis=-1), np.take(y, second[block], axis=-1))
    values = flat.reshape(len(v0), len(v1))
    values[:, ~finite] = WORST_SCORE["ssim"]
    return values


def ssim_pixel_major(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of aligned pairs of pixel-major images (H, W, C, P) already clipped to [0, 1]: shape (P,).

    The one SSIM kernel of the package: ``ssim``, ``pairwise_ssim``, ``paired_ssim`` and the matched pairs'
    scores all call it.

    The statistic of ``ssim`` (scikit-image's uniform window of n = w x w pixels, sample covariance,
    borders of half a window cropped, channels averaged), computed in float64 from the window sums
    Sx, Sy, Sxy and T = Sxx + Syy taken only where the window fits (``metrics.products.window_sums``),
    so the cropped border is never formed. With sums instead of means the factors of n cancel; with
    Q = Sx^2 + Sy^2, each window's value is
    4 (Sx Sy + n^2 C1 / 2)(n Sxy - Sx Sy + n (n-1) C2 / 2) / ((Q + n^2 C1)(n T - Q + n (n-1) C2)).
    float32 would not do: the variances are differences of terms up to n^2 whose round-off is not
    small against n (n-1) C2 (about 2 for a 7 x 7 window) in flat regions.
    """
    window = ssim_window(x.shape[0], x.shape[1])
    n = float(window * window)
    c1 = n * n * (SSIM_K1 * DATA_RANGE) ** 2
    c2 = n * (n - 1.0) * (SSIM_K2 * DATA_RANGE) ** 2
    product = x * y
    sxy = window_sums(product, window)
    np.multiply(x, x, out=product)
    product += y * y
    total = window_sums(product, window)  # T
    sx = window_sums(x, window)
    sy = window_sums(y, window)
    cross = sx * sy
    squares = np.multiply(sx, sx, out=sx)
    squares += np.multiply(sy, sy, out=sy)  # Q
    sxy *= n
    sxy -= cross
    sxy += c2 / 2.0
    cross += c1 / 2.0
    cross *= sxy  # a quarter of the numerator
    total *= n
    total -= squares
    total += c2
    squares += c1
    squares *= total  # the denominator
    cross /= squares
    return 4.0 * cross.mean(axis=(0, 1)).mean(axis=0)
