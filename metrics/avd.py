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
from metrics.products import column_norms, pixel_major, squared_distances

LEVELS = 255
"""Quantisation levels: images are floored to 8 bits, q(v) = floor(255 v) / 255."""


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


def variation_features(
    images: np.ndarray, *, reconstruction: bool, quantize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The AVD maps of a pixel-major batch (H, W, C, N), one column per image, in units of 1/255.

    Applies AVD's pre-processing first (absolute value for a reconstruction, clipping to [0, 1], the
    8-bit floor unless ``quantize=False``) and returns ``(g, h)``: g of shape (C (H-1) (W-1), N) holding
    255 g(v) and h of shape (C (H-2) (W-2), N) holding 255 h(v), the maps of ``first_order_map`` and
    ``second_order_map`` with the image axes leading. Quantised pixels are whole numbers of levels, so
    then the maps hold integers and every sum of their products is exact in float64; the maps
    themselves (integers below 2^24) are formed exactly in float32, which halves their memory traffic.
    The images must be finite (replace non-finite reconstructions first and mark them yourself).
    """
    height, width, channels, count = images.shape
    scaled = np.abs(images) if reconstruction else images.copy()
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= LEVELS  # the float64 product that quantize() floors, so the levels are exactly its
    if quantize:
        v = np.empty(images.shape, dtype=np.float32)
        np.floor(scaled, out=v, casting="same_kind")  # 255 q(v): whole numbers of levels
    else:
        v = scaled
    first_size = (height - 1) * (width - 1) * channels
    features = np.empty((first_size + (height - 2) * (width - 2) * channels, count), dtype=v.dtype)
    first = features[:first_size].reshape(height - 1, width - 1, channels, count)
    second = features[first_size:].reshape(height - 2, width - 2, channels, count)
    # g(i, j) = |v(i+1, j) + v(i, j+1) - 2 v(i+1, j+1)|: Dx v [1:, :] + Dy v [:, 1:] written out
    np.add(v[1:, :-1], v[:-1, 1:], out=first)
    first -= v[1:, 1:]
    first -= v[1:, 1:]
    # h(i, j) = |v(i+2, j) + v(i, j+2) + 2 (v(i+2, j+2) - v(i+2, j+1) - v(i+1, j+2))|:
    # D2x v [2:, :] + D2y v [:, 2:] written out
    np.subtract(v[2:, 2:], v[2:, 1:-1], out=second)
    second -= v[1:-1, 2:]
    second += second
    second += v[2:, :-2]
    second += v[:-2, 2:]
    np.abs(features, out=features)
    features = features.astype(np.float64, copy=False)
    return features[:first_size], features[first_size:]


def avd_matrix(
    first0: np.ndarray,
    second0: np.ndarray,
    first1: np.ndarray,
    second1: np.ndarray,
    *,
    c1: float = 1.0,
    c2: float = 0.5,
    norms0: tuple[np.ndarray, np.ndarray] | None = None,
    norms1: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """N x M AVD between the columns of ``variation_features`` of N originals and of M reconstructions.

    Each mean of squared map differences is squared norms plus one matrix product
    (``metrics.products.squared_distances``); ``norms0`` and ``norms1`` are the squared column norms of
    (first, second) when they are known.
    """
    scale_first = c1 / (first0.shape[0] * LEVELS**2)
    scale_second = c2 / (second0.shape[0] * LEVELS**2)
    n0 = norms0 if norms0 is not None else (None, None)
    n1 = norms1 if norms1 is not None else (None, None)
    distances = squared_distances(first0, first1, n0[0], n1[0])
    distances *= scale_first
    distances += scale_second * squared_distances(second0, second1, n0[1], n1[1])
    return np.sqrt(distances, out=distances)


def paired_avd_of_features(
    first0: np.ndarray,
    second0: np.ndarray,
    first1: np.ndarray,
    second1: np.ndarray,
    *,
    c1: float = 1.0,
    c2: float = 0.5,
) -> np.ndarray:
    """AVD of aligned columns of ``variation_features`` (original k with reconstruction k)."""
    first = first1 - first0
    second = second1 - second0
    return np.sqrt(
        column_norms(first) * (c1 / (first0.shape[0] * LEVELS**2))
        + column_norms(second) * (c2 / (second0.shape[0] * LEVELS**2))
    )


def feature_norms(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared column norms of ``variation_features``' two maps, for ``avd_matrix``."""
    return column_norms(first), column_norms(second)


def pairwise_avd(
    originals: Any,
    reconstructions: Any,
    *,
    quantize: bool = True,
    c1: float = 1.0,
    c2: float = 0.5,
) -> np.ndarray:
    """N x M matrix of AVD between every original (N, ...) and every reconstruction (M, ...).

    Computed by matrix products on the variation maps (``avd_matrix``); equal to ``avd`` pair by pair
    up to float64 round-off, and exactly 0 for identical quantised images. Columns of unrecoverable
    (non-finite) reconstructions are ``inf``.
    """
    _check_weights(c1, c2)
    v0, v1 = as_batch_pair(originals, reconstructions)
    finite = np.isfinite(v1).reshape(len(v1), -1).all(axis=1)
    if not finite.all():
        v1 = np.where(np.isfinite(v1), v1, 0.0)
    g0, h0 = variation_features(pixel_major(v0), reconstruction=False, quantize=quantize)
    g1, h1 = variation_features(pixel_major(v1), reconstruction=True, quantize=quantize)
    costs = avd_matrix(g0, h0, g1, h1, c1=c1, c2=c2)
    costs[:, ~finite] = math.inf
    return costs
