"""Absolute variation distance (AVD) between an original image and its reconstruction.

AVD compares the first- and second-order variation maps of two images instead of their pixels, so a
reconstruction that keeps the shapes of an image scores close to 0 and noise scores about 1
(Papadopoulos, Satsangi, Eloul and Pistoia; Eloul et al., arXiv 2204.12495). The exact formula is in
docs/metrics.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from metrics.images import as_batch_pair, as_image_pair, clip_unit, is_finite_image

LEVELS = 255
"""Quantisation levels: images are floored to 8 bits, q(v) = floor(255 v) / 255."""

PAIRWISE_BLOCK = 1 << 22
"""Elements of one broadcast block of ``pairwise_avd`` (bounds its memory to tens of MiB)."""


def quantize(image: np.ndarray) -> np.ndarray:
    """Floor intensities in [0, 1] to the 8-bit grid: q(v) = floor(255 v) / 255."""
    return np.floor(LEVELS * image) / LEVELS


def first_order_map(image: np.ndarray) -> np.ndarray:
    """g(v) = |Dx v[1:, :] + Dy v[:, 1:]| over the last two axes; shape (..., H-1, W-1).

    Dx v(i, j) = v(i, j) - v(i, j+1) and Dy v(i, j) = v(i, j) - v(i+1, j).
    """
    dx = image[..., :, :-1] - image[..., :, 1:]
    dy = image[..., :-1, :] - image[..., 1:, :]
    return np.abs(dx[..., 1:, :] + dy[..., :, 1:])


def second_order_map(image: np.ndarray) -> np.ndarray:
    """h(v) = |D2x v[2:, :] + D2y v[:, 2:]| over the last two axes; shape (..., H-2, W-2).

    D2x v = Dx v[:, :-1] - Dx v[:, 1:] and D2y v = Dy v[:-1, :] - Dy v[1:, :].
    """
    dx = image[..., :, :-1] - image[..., :, 1:]
    dy = image[..., :-1, :] - image[..., 1:, :]
    d2x = dx[..., :, :-1] - dx[..., :, 1:]
    d2y = dy[..., :-1, :] - dy[..., 1:, :]
    return np.abs(d2x[..., 2:, :] + d2y[..., :, 2:])


def prepare_original(image: np.ndarray, *, quantize_values: bool = True) -> np.ndarray:
    """AVD pre-processing of the original: clip to [0, 1], then quantise unless told not to."""
    clipped = clip_unit(image)
    return quantize(clipped) if quantize_values else clipped


def prepare_reconstruction(image: np.ndarray, *, quantize_values: bool = True) -> np.ndarray:
    """AVD pre-processing of a reconstruction: absolute value, clip to [0, 1], then quantise."""
    return prepare_original(np.abs(image), quantize_values=quantize_values)


def _check_weights(c1: float, c2: float) -> None:
    for name, weight in (("c1", c1), ("c2", c2)):
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {weight}")


def avd(
    original: Any,
    reconstruction: Any,
    *,
    quantize: bool = True,
    c1: float = 1.0,
    c2: float = 0.5,
) -> float:
    """Absolute variation distance between one original and one reconstruction.

    AVD = sqrt(c1 * mean((g(v1) - g(v0))^2) + c2 * mean((h(v1) - h(v0))^2)), with the means over all
    channels and pixels, after v1 <- |v1|, clipping both images to [0, 1] and (unless
    ``quantize=False``) flooring both to 8 bits. Inputs are numpy arrays or torch tensors of shape
    H x W or C x H x W. A reconstruction holding NaN or infinity is unrecoverable and scores
    ``float('inf')``; no exception is raised for it.
    """
    _check_weights(c1, c2)
    v0, v1 = as_image_pair(original, reconstruction)
    if not is_finite_image(v1):
        return math.inf
    v0 = prepare_original(v0, quantize_values=quantize)
    v1 = prepare_reconstruction(v1, quantize_values=quantize)
    first = np.mean((first_order_map(v1) - first_order_map(v0)) ** 2)
    second = np.mean((second_order_map(v1) - second_order_map(v0)) ** 2)
    return float(math.sqrt(c1 * first + c2 * second))


def pairwise_avd(
    originals: Any,
    reconstructions: Any,
    *,
    quantize: bool = True,
    c1: float = 1.0,
    c2: float = 0.5,
) -> np.ndarray:
    """N x M matrix of AVD between every original (N, ...) and every reconstruction (M, ...).

    Columns of unrecoverable (non-finite) reconstructions are ``inf``.
    """
    _check_weights(c1, c2)
    v0, v1 = as_batch_pair(originals, reconstructions)
    finite = np.isfinite(v1).reshape(len(v1), -1).all(axis=1)
    v0 = prepare_original(v0, quantize_values=quantize)
    v1 = prepare_reconstruction(np.where(np.isfinite(v1), v1, 0.0), quantize_values=quantize)
    g0 = first_order_map(v0).reshape(len(v0), -1)
    h0 = second_order_map(v0).reshape(len(v0), -1)
    g1 = first_order_map(v1).reshape(len(v1), -1)
    h1 = second_order_map(v1).reshape(len(v1), -1)
    costs = np.empty((len(v0), len(v1)))
    rows = max(1, PAIRWISE_BLOCK // max(1, len(v1) * g0.shape[1]))  # originals per broadcast block
    for start in range(0, len(v0), rows):
        block = slice(start, start + rows)
        first = np.mean((g1[None] - g0[block, None]) ** 2, axis=2)
        second = np.mean((h1[None] - h0[block, None]) ** 2, axis=2)
        costs[block] = np.sqrt(c1 * first + c2 * second)
    costs[:, ~finite] = math.inf
    return costs
