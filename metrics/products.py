"""Numerical building blocks for scoring many image pairs at once.

Two ideas carry the fast scoring paths (``match_many``, ``baseline_scores``, the ``pairwise_*`` matrices):

- all-pairs squared distances are squared norms plus one matrix product,
  ``|a_i - b_j|^2 = |a_i|^2 + |b_j|^2 - 2 a_i . b_j``, so an N x M score matrix costs one BLAS call
  instead of N x M passes over the pixels;
- images are laid out *pixel-major*, ``(H, W, C, N)``, so that the shifts and window sums of the
  metrics slice the two leading axes and every numpy inner loop runs contiguously over the images.
"""

from __future__ import annotations

import numpy as np


def pixel_major(images: np.ndarray) -> np.ndarray:
    """A batch (N, C, H, W) as a C-contiguous float64 array of shape (H, W, C, N)."""
    return np.ascontiguousarray(np.asarray(images).transpose(2, 3, 1, 0), dtype=np.float64)


def column_norms(features: np.ndarray) -> np.ndarray:
    """Squared Euclidean norm of every column of a (D, N) matrix."""
    return np.einsum("dn,dn->n", features, features)


def squared_distances(
    a: np.ndarray,
    b: np.ndarray,
    norms_a: np.ndarray | None = None,
    norms_b: np.ndarray | None = None,
) -> np.ndarray:
    """N x M matrix of ``sum_d (a[d, i] - b[d, j])^2`` for the columns of ``a`` (D, N) and ``b`` (D, M).

    Computed as ``|a_i|^2 + |b_j|^2 - 2 a_i . b_j`` with one matrix product (pass the squared column
    norms when they are known). Rounding can leave tiny negative values where a column of ``a`` equals
    one of ``b``; they are clamped to 0. The absolute error is a few float64 round-offs of the norms;
    for integer-valued inputs whose sums stay below 2^53 the result is exact.
    """
    norms_a = column_norms(a) if norms_a is None else norms_a
    norms_b = column_norms(b) if norms_b is None else norms_b
    distances = a.T @ b
    distances *= -2.0
    distances += norms_a[:, None]
    distances += norms_b[None, :]
    return np.maximum(distances, 0.0, out=distances)


def _along(images: np.ndarray, axis: int, start: int, size: int) -> np.ndarray:
    index = [slice(None)] * images.ndim
    index[axis] = slice(start, start + size)
    return images[tuple(index)]


def _sliding_sums(images: np.ndarray, window: int, axis: int) -> np.ndarray:
    """Sums of ``window`` consecutive entries along ``axis`` (0 or 1), every start that fits."""
    length = images.shape[axis] - window + 1
    runs = {1: images}  # runs[p]: sums of p consecutive entries, built by doubling
    power = 1
    while 2 * power <= window:
        shorter = runs[power].shape[axis] - power
        runs[2 * power] = _along(runs[power], axis, 0, shorter) + _along(runs[power], axis, power, shorter)
        power *= 2
    sums: np.ndarray | None = None
    offset = 0
    for power in sorted(runs, reverse=True):  # window = sum of its binary digits, largest run first
        if window - offset >= power:
            part = _along(runs[power], axis, offset, length)
            if sums is None:
                sums = part.copy()
            else:
                sums += part
            offset += power
    assert sums is not None
    return sums


def window_sums(images: np.ndarray, window: int) -> np.ndarray:
    """Sums over every ``window`` x ``window`` square that fits inside a pixel-major batch (H, W, ...).

    Returns (H - window + 1, W - window + 1, ...): the "valid" part of a box filter, with no border
    handling, which is all that SSIM keeps once its borders are cropped. Each axis takes runs of 1, 2,
    4, ... pixels by doubling and adds the runs of the window's binary digits (4 + 2 + 1 for a 7-pixel
    window), so a window of w pixels costs about log2(w) passes per axis.
    """
    return _sliding_sums(_sliding_sums(images, window, 0), window, 1)
