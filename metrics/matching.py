"""Pairing the images of a batch with the reconstructions an attack returned, in any order.

An attack on a batch returns its images unordered, and sometimes fewer or more of them than the batch
held. ``match`` builds the N x M score matrix with one metric, solves the optimal one-to-one assignment
(Hungarian method, ``scipy.optimize.linear_sum_assignment``) and scores every matched pair with all
four metrics, vectorised over the pairs (``metrics.paired``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from metrics.avd import avd_matrix, feature_norms, pairwise_avd, variation_features
from metrics.conventions import HIGHER_IS_BETTER, METRIC_NAMES, WORST_SCORE, check_metric_name
from metrics.images import as_batch_pair, as_image_batch, to_float_array
from metrics.paired import PAIRED, pixel_major_finite, scores_of_pairs
from metrics.products import pixel_major
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


def _batch_pair(originals: Any, reconstructions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Originals and reconstructions as checked (N, C, H, W) arrays; an empty reconstruction batch takes their shape."""
    v0 = as_image_batch(originals, "originals")
    recon = to_float_array(reconstructions, "reconstructions")
    if recon.ndim >= 1 and recon.shape[0] == 0:
        recon = np.empty((0, *v0.shape[1:]))
    return as_batch_pair(v0, recon)


def match(originals: Any, reconstructions: Any, metric: str = "avd") -> MatchResult:
    """Optimally pair each original with a distinct reconstruction and score every pair.

    ``originals`` is (N, H, W) or (N, C, H, W) and ``reconstructions`` (M, ...) with the same image
    shape (an empty reconstruction batch may have any trailing shape); numpy arrays or torch tensors.
    The assignment minimises the total ``metric`` ("avd" or "mse") or maximises it ("psnr" or
    "ssim"). With M < N the originals left over get index -1 and the worst scores; with M > N the
    extra reconstructions are ignored.
    """
    check_metric_name(metric)
    v0, v1 = _batch_pair(originals, reconstructions)
    assignment = np.full(len(v0), UNMATCHED, dtype=np.int64)
    scores = {name: np.full(len(v0), WORST_SCORE[name]) for name in METRIC_NAMES}
    if len(v0) == 0 or len(v1) == 0:
        return MatchResult(assignment=assignment, scores=scores, metric=metric)
    rows, cols = linear_sum_assignment(solver_costs(_PAIRWISE[metric](v0, v1), metric))
    assignment[rows] = cols
    for name in METRIC_NAMES:
        scores[name][rows] = PAIRED[name](v0[rows], v1[cols])
    return MatchResult(assignment=assignment, scores=scores, metric=metric)


def match_many(batches: Sequence[tuple[Any, Any]], c1: float = 1.0, c2: float = 0.5) -> list[MatchResult]:
    """``match(originals, reconstructions, "avd")`` for many (originals, reconstructions) pairs at once.

    The variation maps of every image are formed once (``metrics.avd.variation_features``); each
    batch's N x M AVD matrix is then squared norms plus one matrix product per map, exact for the
    quantised images (whole numbers of 8-bit levels); only the assignment runs batch by batch. The
    matched pairs of all batches are scored together: AVD is read from the matrix, MSE from the pixel
    differences, PSNR from the MSE and SSIM from window sums (``metrics.similarity.ssim_pixel_major``).
    The scores equal those of ``match`` up to float64 round-off. The images of all batches must share
    one shape.
    """
    prepared = [_batch_pair(originals, reconstructions) for originals, reconstructions in batches]
    if not prepared:
        return []
    shape = prepared[0][0].shape[1:]
    if any(v0.shape[1:] != shape for v0, _ in prepared):
        raise ValueError("match_many: every batch must hold images of one shape")
    originals = pixel_major(np.concatenate([v0 for v0, _ in prepared]))
    reconstructions, finite = pixel_major_finite(pixel_major(np.concatenate([v1 for _, v1 in prepared])))
    g0, h0 = variation_features(originals, reconstruction=False)
    g1, h1 = variation_features(reconstructions, reconstruction=True)
    norms0, norms1 = feature_norms(g0, h0), feature_norms(g1, h1)
    pair0: list[np.ndarray] = []
    pair1: list[np.ndarray] = []
    distances: list[np.ndarray] = []
    assignments: list[np.ndarray] = []
    start0 = start1 = 0
    for v0, v1 in prepared:
        n, m = len(v0), len(v1)
        assignment = np.full(n, UNMATCHED, dtype=np.int64)
        if n and m:
            s0, s1 = slice(start0, start0 + n), slice(start1, start1 + m)
            costs = avd_matrix(
                g0[:, s0],
                h0[:, s0],
                g1[:, s1],
                h1[:, s1],
                c1=c1,
                c2=c2,
                norms0=(norms0[0][s0], norms0[1][s0]),
                norms1=(norms1[0][s1], norms1[1][s1]),
            )
            costs[:, ~finite[s1]] = np.inf
            rows, cols = linear_sum_assignment(solver_costs(costs, "avd"))
            assignment[rows] = cols
            pair0.append(rows + start0)
            pair1.append(cols + start1)
            distances.append(costs[rows, cols])
        assignments.append(assignment)
        start0, start1 = start0 + n, start1 + m
    matched: dict[str, np.ndarray] = {}
    if pair0:
        first, second = np.concatenate(pair0), np.concatenate(pair1)
        matched = scores_of_pairs(originals, reconstructions, first, second, finite, avd=np.concatenate(distances))
    results = []
    offset = 0
    for assignment in assignments:
        scores = {name: np.full(len(assignment), WORST_SCORE[name]) for name in METRIC_NAMES}
        rows = np.flatnonzero(assignment >= 0)
        for name in matched:
            scores[name][rows] = matched[name][offset : offset + len(rows)]
        offset += len(rows)
        results.append(MatchResult(assignment=assignment, scores=scores, metric="avd"))
    return results
