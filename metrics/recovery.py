"""Deciding which reconstructions count as recovered images.

A sample is recovered when its SSIM reaches ``DEFAULT_SSIM_THRESHOLD`` or its AVD is at most
``DEFAULT_AVD_THRESHOLD``. The AVD threshold was calibrated on real attack output (the 398 MNIST
reconstructions in shared/data/mnist_reconstructions.npz, matched per batch by AVD): 0.02 is the
round value in the plateau of best agreement with the SSIM >= 0.9 criterion; see docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

DEFAULT_SSIM_THRESHOLD = 0.9
"""SSIM at or above which a reconstruction counts as recovered."""

DEFAULT_AVD_THRESHOLD = 0.02
"""AVD at or below which a reconstruction counts as recovered (calibrated, see docs/metrics.md)."""


def _score_array(scores: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in scores:
        raise ValueError(f"scores must hold a {name!r} array, got keys {sorted(scores)}")
    values = np.asarray(scores[name], dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"scores[{name!r}] must be one-dimensional, got shape {values.shape}")
    return values


def recovered(
    scores: Mapping[str, np.ndarray],
    *,
    ssim_threshold: float = DEFAULT_SSIM_THRESHOLD,
    avd_threshold: float = DEFAULT_AVD_THRESHOLD,
) -> np.ndarray:
    """Boolean per sample: True when SSIM >= ``ssim_threshold`` or AVD <= ``avd_threshold``.

    ``scores`` maps "ssim" and "avd" to equal-length 1-D arrays (as in ``MatchResult.scores``).
    Unrecoverable samples (AVD ``inf``, SSIM -1) are never recovered.
    """
    for name, threshold in (("ssim_threshold", ssim_threshold), ("avd_threshold", avd_threshold)):
        if not math.isfinite(threshold):
            raise ValueError(f"{name} must be a finite number, got {threshold}")
    similarity = _score_array(scores, "ssim")
    distance = _score_array(scores, "avd")
    if similarity.shape != distance.shape:
        raise ValueError(
            f"scores['ssim'] and scores['avd'] must have the same shape, "
            f"got {similarity.shape} and {distance.shape}"
        )
    return (similarity >= ssim_threshold) | (distance <= avd_threshold)
