"""Pairing the images of a batch with the reconstructions an attack returned, in any order.

An attack on a batch returns its images unordered, and sometimes fewer or more of them than the batch
held. ``match`` builds the N x M score matrix with one metric, solves the optimal one-to-one assignment
(Hungarian method, ``scipy.optimize.linear_sum_assignment``) and scores every matched pair with all
four metrics, vectorised over the pairs (``metrics.paired``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from metrics.avd import pairwise_avd
from metrics.conventions import HIGHER_IS_BETTER, METRIC_NAMES, WORST_SCORE, check_metric_name
from metrics.images import as_batch_pair, as_image_batch, to_float_array
from metrics.paired import PAIRED
from metrics.similarity import pairwise_mse, pairwise_psnr, pairwise_ssim

UNMATCHED = -1
"""Assignment entry of an original that no reconstruction was matched to."""

_PAIRWISE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "avd": pairwise_avd,
    "mse": pairwise_mse,
    "psnr": pairwise_psnr,
    "ssim": pairwise_ssim,
}


@dataclass(frozen=True)
class MatchResult:
    """The optimal pairing of N originals with reconstructions, and the scores of each pair.

    ``assignment[i]`` is the index of the reconstruction matched to original ``i``, or -1 when none
    was (fewer reconstructions than originals). ``scores`` maps each of "avd", "mse", "psnr" and
    "ssim" to an (N,) float array; unmatched originals hold the worst value of every score.
    ``metric`` names the score the assignment optimised.
    """

    assignment: np.ndarray
    scores: dict[str, np.ndarray]
    metric: str = "avd"

    @property
    def n(self) -> int:
        """Number of originals."""
        return len(self.assignment)


def solver_costs(scores: np.ndarray, metric: str) -> np.ndarray:
    """Turn an N x M score matrix into finite costs to minimise for the assignment solver.

    Maximised scores are negated; non-finite costs become a finite value larger than any real one.
    """
    costs = -scores if HIGHER_IS_BETTER[check_metric_name(metric)] else scores.copy()
    finite = np.isfinite(costs)
    largest = float(np.abs(costs[finite]).max()) if finite.any() else 0.0
    costs[~finite] = 2.0 * largest + 1.0
    return costs


def match(originals: Any, reconstructions: Any, metric: str = "avd") -> MatchResult:
    """Optimally pair each original with a distinct reconstruction and score every pair.

    ``originals`` is (N, H, W) or (N, C, H, W) and ``reconstructions`` (M, ...) with the same image
    shape (an empty reconstruction batch may have any trailing shape); numpy arrays or torch tensors.
    The assignment minimises the total ``metric`` ("avd" or "mse") or maximises it ("psnr" or
    "ssim"). With M < N the originals left over get index -1 and the worst scores; with M > N the
    extra reconstructions are ignored.
    """
    check_metric_name(metric)
    v0 = as_image_batch(originals, "originals")
    recon = to_float_array(reconstructions, "reconstructions")
    if recon.ndim >= 1 and recon.shape[0] == 0:
        recon = np.empty((0, *v0.shape[1:]))
    v0, v1 = as_batch_pair(v0, recon)
    assignment = np.full(len(v0), UNMATCHED, dtype=np.int64)
    scores = {name: np.full(len(v0), WORST_SCORE[name]) for name in METRIC_NAMES}
    if len(v0) == 0 or len(v1) == 0:
        return MatchResult(assignment=assignment, scores=scores, metric=metric)
    rows, cols = linear_sum_assignment(solver_costs(_PAIRWISE[metric](v0, v1), metric))
    assignment[rows] = cols
    for name in METRIC_NAMES:
        scores[name][rows] = PAIRED[name](v0[rows], v1[cols])
    return MatchResult(assignment=assignment, scores=scores, metric=metric)
