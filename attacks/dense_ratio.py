"""Row-ratio recovery of the input of the first dense layer (Phong et al. 2017)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.layers import first_dense_on_image, summed_gradient
from attacks.params import Param
from attacks.view import AttackerView, Reconstruction


def _distinct_rows(candidates: Tensor, limit: int, threshold: float) -> list[int]:
    """Indices of up to ``limit`` candidates (already ranked) whose cosine similarity to every kept one
    stays at or below ``threshold``."""
    unit = candidates / candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
    kept: list[int] = []
    for index in range(candidates.shape[0]):
        if kept and float((unit[kept] @ unit[index]).max()) > threshold:
            continue
        kept.append(index)
        if len(kept) == limit:
            break
    return kept


class DenseRatio(Attack):
    """x_hat_j = gW_j / gb_j on the first dense layer, whose input must be the flattened image.

    One sample: every usable row equals the image; the row of largest |gb_j| is returned. Batches:
    rows are mixtures of samples; distinct rows (by cosine similarity) are returned, ranked by |gb_j|,
    at most ``num_samples`` of them.
    """

    name: ClassVar[str] = "dense-ratio"
    parameters: ClassVar[dict[str, Param]] = {
        "tol": Param(1e-6, float, minimum=0.0, help="rows with |gb_j| <= tol * max|gb| are skipped"),
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
        usable = usable[torch.argsort(magnitude[usable], descending=True)]
        candidates = weight[usable] / bias[usable, None]
        limit = 1 if view.num_samples == 1 else view.num_samples
        kept = _distinct_rows(candidates, limit, self.params["dedup_cosine"])
        images = candidates[kept].to(torch.float32).reshape(len(kept), *view.input_shape)
        return Reconstruction(
            images=images,
            labels=None,
            diagnostics={"rows_used": float(usable.numel()), "candidates": float(len(kept))},
        )
