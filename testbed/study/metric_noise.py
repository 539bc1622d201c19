"""Which metric still sees the image in a noisy copy: the test behind the AVD claim.

A noisy copy ``x + sigma * e`` (e standard normal, not clipped) still shows ``x`` to a person up to large
sigma. A leakage metric should then score the copy closer to ``x`` than what an attacker knows without
the update (the no-information baselines: a blank image, the class mean, a random image of the class,
from a held-out split). For each sigma and metric, the table gives the share of images whose noisy copy
beats the best baseline under that metric; a metric that measures leakage in noisy images better keeps
that share high to a larger sigma.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import METRIC_NAMES, ClassPrototypes, baseline_scores, best_baseline

SIGMAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
HIGHER = ("psnr", "ssim")


def noise_rows(
    images: np.ndarray,
    labels: np.ndarray,
    held_out: tuple[np.ndarray, np.ndarray],
    *,
    sigmas: Sequence[float] = SIGMAS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (sigma, metric): the share of ``images`` whose noisy copy beats every baseline."""
    rng = np.random.default_rng(seed)
    images = np.asarray(images, dtype=np.float64)
    drawn = ClassPrototypes(*held_out).draw(labels, rng)
    base = best_baseline(baseline_scores(images, drawn))
    rows: list[dict[str, Any]] = []
    for sigma in sigmas:
        noisy = images + sigma * rng.standard_normal(images.shape)
        scores = baseline_scores(images, {"noisy": noisy})["noisy"]
        for metric in METRIC_NAMES:
            beats = scores[metric] > base[metric] if metric in HIGHER else scores[metric] < base[metric]
            rows.append({"sigma": sigma, "metric": metric, "detected": float(np.mean(beats)), "images": len(images)})
    return rows


def tolerance(rows: Sequence[dict[str, Any]], metric: str, share: float = 0.9) -> float:
    """The largest sigma up to which ``metric`` detects at least ``share`` of the noisy copies (0 if none)."""
    best = 0.0
    for row in sorted((r for r in rows if r["metric"] == metric), key=lambda r: float(r["sigma"])):
        if float(row["detected"]) < share:
            break
        best = float(row["sigma"])
    return best
