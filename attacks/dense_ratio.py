"""Row-ratio recovery of the input of the first dense layer (Phong et al. 2017).

Copy detection compares the candidate rows pairwise. Done directly (``ranked_distinct_rows``) that is
an H x H x D product per update, several times the cost of training the client. ``near_pairs`` gets
the same candidates more cheaply: a batch of B samples puts every
row of the first layer's weight gradient in the span of the B inputs, so the rows are projected onto
an orthonormal basis of a few more than B of them (H x D x k for the projection, k << D), where their
pairwise products cost H x H x k. A projection onto an orthonormal basis never lengthens a vector, so
the part of each row outside the basis bounds the error of every projected cosine; only the pairs
whose bound does not exclude them from both thresholds (exact copies among them) are verified on the
full float64 rows, and every other pair is certainly below both. The decisions (support, order and
merging) are therefore those of the all-pairs cosine, up to round-off of the cosine itself. The updates
of a batch are screened together (``near_pairs_many``: one batched QR and batched bounds), and the
ranking reads only the verified pairs (``rank_from_pairs``), never an H x H matrix.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from attacks.base import Attack
from attacks.copy_ranking import SAFE_THRESHOLD, rank_by_units
from attacks.layers import first_dense_on_image, gradient_factors, gradient_rows, summed_gradient
from attacks.params import Param
from attacks.view import AttackerView, Reconstruction

OVERSAMPLE = 4
"""Basis rows beyond the number of samples behind an update (spare ones for rows that repeat)."""
MARGIN = 1e-3
"""Slack added to every projected cosine's bound before pairs are excluded (float32 products and basis
round-off are below 1e-5); pairs within it of a threshold are verified exactly."""
DENSE_FRACTION = 0.125
"""A view with more candidate pairs to verify than this fraction of all pairs takes the all-pairs product."""
SCREEN_BLOCK = 16
"""Updates screened per batched call (bounds the stacked copy of their weight rows)."""


def rank_by_similarity(
    similarity: np.ndarray, magnitude: np.ndarray, limit: int, copy_cosine: float, dedup_cosine: float
) -> tuple[list[int], np.ndarray]:
    """Up to ``limit`` indices, most-copied first, pairwise no closer than ``dedup_cosine``, from the cosines.

    A candidate's support is how many candidates (itself included) reach ``copy_cosine`` with it. The
    order is support, then ``magnitude`` (|gb|), both descending, ties by index; a candidate above
    ``dedup_cosine`` to one already kept is merged into it. Entries of ``similarity`` need only be right
    about which side of each threshold they are on.
    """
    support = (similarity >= copy_cosine).sum(axis=1)
    order = np.lexsort((-magnitude, -support))  # by support, then |gb|, both descending
    kept: list[int] = []
    for index in order.tolist():
        if kept and similarity[index, kept].max() > dedup_cosine:
            continue
        kept.append(index)
        if len(kept) == limit:
            break
    return kept, support[kept]


def ranked_distinct_rows(
    candidates: Tensor, magnitude: Tensor, limit: int, copy_cosine: float, dedup_cosine: float
) -> tuple[list[int], Tensor]:
    """The all-pairs reference: ``rank_by_similarity`` on the float64 cosine of every pair of candidate rows."""
    unit = candidates / candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similarity = (unit @ unit.T).numpy()
    kept, support = rank_by_similarity(similarity, magnitude.numpy(), limit, copy_cosine, dedup_cosine)
    return kept, torch.from_numpy(support)


@dataclass(frozen=True)
class NearPairs:
    """The projected screen of one update: the candidate pairs (i < j) left to verify, and each row's norm."""

    pairs: Tensor  # (P, 2) row indices into the layer's rows
    norms: Tensor  # (H,) float32 norm of every row of the weight update
    needs_all_pairs: bool


def near_pairs(weight: Tensor, bias: Tensor, usable: Tensor, basis_rows: int, threshold: float) -> NearPairs:
    """Pairs of usable rows of one update whose cosine may reach ``threshold``.

    ``weight`` is ``(H, D)``, ``bias`` ``(H,)`` (any float type; each may be scaled by one nonzero factor): the
    candidates are the rows of ``weight`` divided by ``bias``. ``usable`` is ``(H,)`` boolean. The cosine of
    rows i and j is u_i . u_j = p_i . p_j + r_i . r_j for unit rows u split into their projection p onto an
    orthonormal basis and the rest r, and |r_i . r_j| <= |r_i| |r_j|, so a pair with
    p_i . p_j + |r_i| |r_j| + MARGIN below ``threshold`` is certainly below it. The basis spans the
    ``basis_rows`` usable rows of largest norm (all of a batch's rows when it has at most that many samples).
    """
    return near_pairs_many([weight], bias[None], usable[None], basis_rows, threshold)[0]


def near_pairs_many(
    weights: Sequence[Tensor], biases: Tensor, usable: Tensor, basis_rows: int, threshold: float
) -> list[NearPairs]:
    """``near_pairs`` of V updates at once: ``weights`` V tensors (H, D), ``biases`` and ``usable`` (V, H).

    One batched QR and batched bounds instead of V small calls; the weight rows are read where they lie
    (never stacked into one copy). Each update's answer is its own.
    """
    rows32 = [weight.detach().to(torch.float32) for weight in weights]
    norms = torch.stack([rows.norm(dim=1) for rows in rows32])
    live = usable.to(norms.device) & (norms > 0)
    scale = torch.sign(biases).to(torch.float32) / norms.clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.where(live, scale, torch.zeros_like(scale))
    chosen = torch.where(live, norms, torch.full_like(norms, -1.0)).topk(basis_rows, dim=1).indices
    picked = torch.stack([rows[index] for rows, index in zip(rows32, chosen, strict=True)])
    basis, _ = torch.linalg.qr(picked.transpose(1, 2))  # (V, D, k), orthonormal columns
    projected = torch.stack([rows @ base for rows, base in zip(rows32, basis, strict=True)]) * scale[:, :, None]
    outside = (live.to(torch.float32) - projected.pow(2).sum(dim=2)).clamp_min(0.0).sqrt()
    bound = torch.baddbmm(outside[:, :, None] * outside[:, None, :], projected, projected.transpose(1, 2))
    candidate = (bound >= threshold - MARGIN) & live[:, :, None] & live[:, None, :]
    found = torch.nonzero(torch.triu(candidate, diagonal=1))  # (P, 3): update, i, j
    per_update = torch.bincount(found[:, 0], minlength=len(rows32)).tolist()
    counts = live.sum(dim=1).tolist()
    return [
        NearPairs(pairs[:, 1:], norms[v], len(pairs) > counts[v] * (counts[v] - 1) // 2 * DENSE_FRACTION)
        for v, pairs in enumerate(torch.split(found, per_update))
    ]


def rank_from_pairs(
    diagonal: np.ndarray,
    pairs: np.ndarray,
    cosines: np.ndarray,
    magnitude: np.ndarray,
    limit: int,
    copy_cosine: float,
    dedup_cosine: float,
) -> tuple[list[int], np.ndarray]:
    """``rank_by_similarity`` when only the pairs ``pairs`` (P, 2) can reach either threshold (> 0).

    ``diagonal`` holds each candidate's cosine with itself and ``cosines`` the verified cosine of each
    pair; every other pair is below both thresholds, so the N x N matrix is never formed.
    """
    support = (diagonal >= copy_cosine).astype(np.int64)
    copies = pairs[cosines >= copy_cosine]
    support += np.bincount(copies.ravel(), minlength=len(diagonal))
    order = np.lexsort((-magnitude, -support))
    close: dict[int, list[int]] = {}
    for i, j in pairs[cosines > dedup_cosine].tolist():
        close.setdefault(i, []).append(j)
        close.setdefault(j, []).append(i)
    kept: list[int] = []
    taken: set[int] = set()
    for index in order.tolist():
        if any(other in taken for other in close.get(index, ())):
            continue
        kept.append(index)
        taken.add(index)
        if len(kept) == limit:
            break
    return kept, support[kept]


class DenseRatio(Attack):
    """x_hat_j = gW_j / gb_j on the first dense layer, whose input must be the flattened image.

    One sample: every usable row equals the image; one row (the largest |gb_j|) is returned. Batches:
    each row is a mixture of samples; candidates are ranked by how many rows repeat them (a sample
    that alone drives several units repeats, mixtures do not), then by |gb_j|, and near-duplicates are
    merged; at most ``num_samples`` are returned.
    """

    name: ClassVar[str] = "dense-ratio"
    reads_factors: ClassVar[bool] = True
    parameters: ClassVar[dict[str, Param]] = {
        "tol": Param(1e-6, float, minimum=0.0, help="rows with |gb_j| <= tol * max|gb| are skipped"),
        "copy_cosine": Param(
            1 - 1e-6, float, minimum=-1.0, maximum=1.0, help="rows at least this similar count as copies"
        ),
        "dedup_cosine": Param(
            0.99,
            float,
            minimum=-1.0,
            maximum=1.0,
            help="candidates above this cosine to a kept one are merged",
        ),
    }

    def check(self, view: AttackerView) -> None:
        """The first dense layer must directly read the flattened image."""
        first_dense_on_image(view.model, view.input_shape, self.name)

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        return self._solve([view])[0]

    def batch_key(self, view: AttackerView) -> Hashable:
        """Views whose first layers have one shape are screened together; the kept candidates are those of
        ``ranked_distinct_rows`` on each view (see the module docstring)."""
        layer = first_dense_on_image(view.model, view.input_shape, self.name)
        return (layer.weight_key, tuple(layer.module.weight.shape))

    def _reconstruct_batch(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        return self._solve(views)

    def _usable(self, bias: Tensor) -> Tensor:
        magnitude = bias.abs()
        largest = magnitude.amax(dim=-1, keepdim=True)
        return (magnitude > self.params["tol"] * largest) & (largest > 0)

    def _solve(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """Views whose first dense layers have one shape: factored views ranked together, formed ones screened
        together and then ranked one by one."""
        layer = first_dense_on_image(views[0].model, views[0].input_shape, self.name)
        copy_cosine, dedup_cosine = self.params["copy_cosine"], self.params["dedup_cosine"]
        bias = torch.stack([summed_gradient(view, layer.bias_key) for view in views])
        usable = self._usable(bias)
        rows, width = layer.module.weight.shape
        basis_rows = min(rows, max(view.num_samples for view in views) + OVERSAMPLE)
        threshold = min(copy_cosine, dedup_cosine)
        unsafe = max(copy_cosine, dedup_cosine) > SAFE_THRESHOLD or threshold <= 0
        screened = not (unsafe or 4 * basis_rows > width or 2 * basis_rows > rows)  # else all pairs pay
        screens: list[NearPairs | None] = [None] * len(views)
        formed = [i for i, view in enumerate(views) if layer.weight_key not in view.factors]
        if screened:
            for start in range(0, len(formed), SCREEN_BLOCK):
                block = formed[start : start + SCREEN_BLOCK]
                weights = [views[i].update[layer.weight_key].detach().cpu() for i in block]
                found = near_pairs_many(weights, bias[block], usable[block], basis_rows, threshold)
                for i, near in zip(block, found, strict=True):
                    screens[i] = near
        factored = [i for i, view in enumerate(views) if layer.weight_key in view.factors]
        answers = dict(
            zip(
                factored,
                self._factored_many([views[i] for i in factored], layer.weight_key, bias[factored], usable[factored]),
                strict=True,
            )
        )
        results = []
        for position, (view, screen) in enumerate(zip(views, screens, strict=True)):
            if position in answers:
                results.append(answers[position])
            elif screen is None or screen.needs_all_pairs:
                results.append(self._all_pairs(view, layer.weight_key, bias[position], usable[position]))
            else:
                results.append(self._screened(view, layer.weight_key, bias[position], usable[position], screen))
        return results

    def _empty(self, view: AttackerView) -> Reconstruction:
        return Reconstruction(
            images=torch.zeros((0, *view.input_shape)),
            labels=None,
            diagnostics={"rows_used": 0.0, "candidates": 0.0},
        )

    def _answer(
        self, view: AttackerView, weight_key: str, bias: Tensor, rows: Tensor, support: Tensor, count: int
    ) -> Reconstruction:
        """The kept rows (indices into the layer's rows) as images, with the diagnostics."""
        candidates = gradient_rows(view, weight_key, rows) / bias[rows, None]
        return Reconstruction(
            images=candidates.to(torch.float32).reshape(len(rows), *view.input_shape),
            labels=None,
            diagnostics={"rows_used": float(count), "candidates": float(len(rows)), "top_support": float(support[0])},
        )

    def _all_pairs(self, view: AttackerView, weight_key: str, bias: Tensor, usable_mask: Tensor) -> Reconstruction:
        usable = torch.nonzero(usable_mask).flatten()
        if usable.numel() == 0:
            return self._empty(view)
        candidates = summed_gradient(view, weight_key)[usable] / bias[usable, None]
        kept, support = ranked_distinct_rows(
            candidates,
            bias.abs()[usable],
            view.num_samples,
            self.params["copy_cosine"],
            self.params["dedup_cosine"],
        )
        return self._answer(view, weight_key, bias, usable[kept], support, usable.numel())

    def _factored_many(
        self, views: Sequence[AttackerView], weight_key: str, bias: Tensor, usable: Tensor
    ) -> list[Reconstruction]:
        """The all-pairs cosine of every view read from its thin SVD, all views at once.

        With V orthonormal, row i of L @ V.T has the length and the inner products of row i of L, so a
        pair costs r (the update's rank) multiply-adds. The factors of all views are stacked (padded
        with zero columns, which change no product) and ranked together from the rows' unit vectors
        (``attacks.copy_ranking.rank_by_units``: copies found among neighbours of a sorted projection,
        closeness taken against the kept rows only; the float64 cosine decides every relation; a threshold
        within 1e-9 of +-1 is decided by the last bit of a cosine, so such views are ranked one by one
        from the matrix product, as on formed updates). The kept rows of every view, over their biases,
        become images through one batched float32 product (round-off about 1e-7 of the image's largest
        pixel, far below an 8-bit level).
        """
        if not views:
            return []
        factors = [gradient_factors(view, weight_key) for view in views]
        rank = max(left.shape[1] for left, _ in factors)
        rows, width = factors[0][0].shape[0], factors[0][1].shape[0]
        lefts = torch.zeros((len(views), rows, rank), dtype=torch.float64)
        for v, (left, _) in enumerate(factors):
            lefts[v, :, : left.shape[1]] = left
        signed = lefts * (torch.sign(bias) * usable)[:, :, None]  # candidate j points along gW_j / gb_j
        unit = signed / signed.norm(dim=2, keepdim=True).clamp_min(1e-30)  # an unusable row is 0
        copy_cosine, dedup_cosine = self.params["copy_cosine"], self.params["dedup_cosine"]
        limits = [view.num_samples for view in views]
        if max(abs(copy_cosine), abs(dedup_cosine)) > SAFE_THRESHOLD:  # decided by the last bit: as the reference
            ranked = []
            for v, limit in enumerate(limits):
                members = torch.nonzero(usable[v]).flatten()
                own = unit[v, members]
                kept, support = rank_by_similarity(
                    (own @ own.T).numpy(), bias[v, members].abs().numpy(), limit, copy_cosine, dedup_cosine
                )
                ranked.append((members[kept].tolist(), support))
        else:
            ranked = rank_by_units(unit.numpy(), usable.numpy(), bias.abs().numpy(), limits, copy_cosine, dedup_cosine)
        most = max(len(kept) for kept, _ in ranked)
        slots = torch.zeros((len(views), most), dtype=torch.long)
        for v, (kept, _) in enumerate(ranked):
            slots[v, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        # each kept row over its bias (float64), then times V^T in float32: images are float32 anyway
        picked = (
            torch.gather(lefts, 1, slots[:, :, None].expand(-1, -1, rank)) / torch.gather(bias, 1, slots)[:, :, None]
        )
        rights = torch.zeros((len(views), rank, width), dtype=torch.float32)  # V^T, rows contiguous
        for v, (_, right) in enumerate(factors):
            rights[v, : right.shape[1]] = right.T
        images = torch.bmm(picked.to(torch.float32), rights)
        counts = usable.sum(dim=1).tolist()
        results = []
        for v, (member, (kept, support)) in enumerate(zip(views, ranked, strict=True)):
            if not kept:
                results.append(self._empty(member))
                continue
            results.append(
                Reconstruction(
                    images=images[v, : len(kept)].reshape(len(kept), *member.input_shape).clone(),
                    labels=None,
                    diagnostics={
                        "rows_used": float(counts[v]),
                        "candidates": float(len(kept)),
                        "top_support": float(support[0]),
                    },
                )
            )
        return results

    def _screened(
        self, view: AttackerView, weight_key: str, bias: Tensor, usable_mask: Tensor, screen: NearPairs
    ) -> Reconstruction:
        """Rank from the verified near pairs; every other pair of usable rows is below both thresholds."""
        usable = torch.nonzero(usable_mask).flatten()
        if usable.numel() == 0:
            return self._empty(view)
        position = torch.full((bias.shape[0],), -1, dtype=torch.long)
        position[usable] = torch.arange(usable.numel())
        copy_cosine, dedup_cosine = self.params["copy_cosine"], self.params["dedup_cosine"]
        # a row's cosine with itself is 1 to round-off (0 for an all-zero row), far from a safe threshold
        pairs = screen.pairs
        diagonal = (screen.norms[usable] > 0).to(torch.float64).numpy()
        magnitude = bias.abs()[usable].numpy()
        exact = np.zeros(0)
        if pairs.numel():
            involved = torch.unique(pairs.flatten())
            candidates = gradient_rows(view, weight_key, involved) / bias[involved, None]
            unit = candidates / candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
            slot = torch.full((bias.shape[0],), -1, dtype=torch.long)
            slot[involved] = torch.arange(involved.numel())
            exact = (unit[slot[pairs[:, 0]]] * unit[slot[pairs[:, 1]]]).sum(dim=1).numpy()
        local = position[pairs].numpy().reshape(-1, 2)
        kept, support = rank_from_pairs(diagonal, local, exact, magnitude, view.num_samples, copy_cosine, dedup_cosine)
        return self._answer(view, weight_key, bias, usable[kept], torch.from_numpy(support), len(usable))
