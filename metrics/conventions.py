"""What each leakage score means: its name, its direction and its worst value.

A reconstruction that contains NaN or infinity is *unrecoverable*; an original that no reconstruction
was matched to is treated the same way. Both receive the worst value of every score:

- ``avd``: ``inf`` (lower is better; 0 for a perfect copy)
- ``mse``: ``inf`` (lower is better; 0 for a perfect copy)
- ``psnr``: ``0.0`` dB (higher is better; after clipping to [0, 1] the MSE is at most 1, so 0 dB is the
  lowest value a finite image can reach; a perfect copy scores ``PSNR_CEILING_DB``)
- ``ssim``: ``-1.0`` (higher is better; 1 for a perfect copy)
"""

from __future__ import annotations

import math

METRIC_NAMES: tuple[str, ...] = ("avd", "mse", "psnr", "ssim")
"""The scores computed for every matched pair, in reporting order."""

HIGHER_IS_BETTER: dict[str, bool] = {"avd": False, "mse": False, "psnr": True, "ssim": True}
"""Whether a larger value of each score means a closer reconstruction."""

WORST_SCORE: dict[str, float] = {"avd": math.inf, "mse": math.inf, "psnr": 0.0, "ssim": -1.0}
"""The score given to an unrecoverable or unmatched image."""

PSNR_CEILING_DB: float = 100.0
"""PSNR reported for identical images (and any MSE below 1e-10), so a perfect copy stays finite."""


def check_metric_name(metric: str) -> str:
    """Return ``metric`` if it names a known score, else raise a one-line ``ValueError``."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {', '.join(METRIC_NAMES)}; got {metric!r}")
    return metric
