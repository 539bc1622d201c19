"""Numerical building blocks for scoring many image pairs at once.

Two ideas carry the fast scoring paths (``match_many``, ``baseline_scores``, the ``pairwise_*`` matrices):

- all-pairs squared distances are squared norms plus one matrix product,
  ``|a_i - b_j|^2 = |a_i|^2 + |b_j|^2 - 2 a_i . b_j``, so an N x M score matrix costs one BLAS call
  instead of N x M passes over the pixels;
- images are laid out *pixel-major*, ``(H, W, C, N)``, so that the shifts of the metrics slice the two
  leading axes, every numpy inner loop runs contiguously over the images, and a window sum along an
  image axis is one matrix product with a band of ones over the whole batch.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=16)
def _band(length: int, window: int) -> np.ndarray:
    """The (length - window + 1) x length matrix whose row k sums entries k to k + window - 1."""
    starts = np.arange(length - window + 1)[:, None]
    columns = np.arange(length)[None, :]
    band = ((columns >= starts) & (columns < starts + window)).astype(np.float64)
    band.setflags(write=False)  # shared by every caller through the cache
    return band


def window_sums(images: np.ndarray, window: int) -> np.ndarray:
    """Sums over every ``window`` x ``window`` square that fits inside a pixel-major batch (H, W, ...).

    Returns (H - window + 1, W - window + 1, ...): the "valid" part of a box filter, with no border
    handling, which is all that SSIM keeps once its borders are cropped. Each axis is one matrix product
    with a band of ones (the rows axis one product over the whole batch, the columns axis one per output
    row), so the sums run in BLAS rather than as a chain of whole-array additions; float64, exact to a
    few round-offs of the window's largest sum.
    """
    height, width = images.shape[:2]
    rest = images.shape[2:]
    rows = (_band(height, window) @ images.reshape(height, -1)).reshape(height - window + 1, width, -1)
    return np.matmul(_band(width, window), rows).reshape(height - window + 1, width - window + 1, *rest)
