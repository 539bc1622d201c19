"""Row-ratio recovery of the input of the first dense layer (Phong et al. 2017)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from attacks.base import Attack
from attacks.layers import first_dense_on_image, summed_gradient
from attacks.params import Param
from attacks.view import AttackerView, Reconstruction


def _ranked_distinct_rows(
    candidates: Tensor, magnitude: Tensor, limit: int, copy_cosine: float, dedup_cosine: float
) -> tuple[list[int], Tensor]:
    """Up to ``limit`` candidate indices, most-copied first, pairwise no closer than ``dedup_cosine``.

    A candidate's support is how many candidates equal it up to ``copy_cosine``: a sample that alone
    drives many rows shows up many times, while each mixture row is unique. Ties go to larger |gb|.
    """
    unit = candidates / candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similarity = (unit @ unit.T).numpy()
    support = (similarity >= copy_cosine).sum(axis=1)
    order = np.lexsort((-magnitude.numpy(), -support))  # by support, then |gb|, both descending
    kept: list[int] = []
    for index in order.tolist():
        if kept and similarity[index, kept].max() > dedup_cosine:
            continue
        kept.append(index)
        if len(kept) == limit:
            break
    return kept, torch.from_numpy(support[kept])


class DenseRatio(Attack):
    """x_hat_j = gW_j / gb_j on the first dense layer, whose input must be the flattened image.

    One sample: every usable row equals the image; one row (the largest |gb_j|) is returned. Batches:
    each row is a mixture of samples; candidates are ranked by how many rows repeat them (a sample
    that alone drives several units repeats, mixtures do not), then by |gb_j|, and near-duplicates are
    merged; at most ``num_samples`` are returned.
    """

    name: ClassVar[str] = "dense-ratio"
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
        layer = first_dense_on_image(view.model, view.input_shape, self.name)
        weight = summed_gradient(view, layer.weight_key)
        bias = summed_gradient(view, layer.bias_key)
        magnitude = bias.abs()
        largest = float(magnitude.max())
        usable = torch.nonzero(magnitude > self.params["tol"] * largest).flatten() if largest > 0 else None
        if usable is None or usable.numel() == 0:
            return Reconstruction(
                images=torch.zeros((0, *view.input_shape)),
                labels=None,
                diagnostics={"rows_used": 0.0, "candidates": 0.0},
            )
        candidates = weight[usable] / bias[usable, None]
        kept, support = _ranked_distinct_rows(
            candidates,
            magnitude[usable],
            view.num_samples,
            self.params["copy_cosine"],
            self.params["dedup_cosine"],
        )
        images = candidates[kept].to(torch.float32).reshape(len(kept), *view.input_shape)
        return Reconstruction(
            images=images,
            labels=None,
            diagnostics={
                "rows_used": float(usable.numel()),
                "candidates": float(len(kept)),
                "top_support": float(support[0]),
            },
        )
