"""Closed-form de-mixing of a batch through softmax + cross-entropy (Eloul et al. 2022).

For the final dense layer, gW = (1/B) G^T H with G = P - Y (B x C), so H = B pinv(G^T) gW once the
predicted probabilities P are known; P is re-estimated from H by a few fixed-point solves. On a dense
network the per-sample error signals are then carried back layer by layer (the activation's slope is
read from the recovered activations) and the same solve recovers each layer's input, down to the image.
"""

from __future__ import annotations

from math import prod
from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.label_inference import infer_labels
from attacks.layers import activation_slope, dense_chain, summed_gradient
from attacks.params import Param
from attacks.view import AttackerView, AttackNotApplicable, Reconstruction


def _solve_inputs(error: Tensor, weight_gradient: Tensor, rtol: float) -> Tensor:
    """The layer inputs H (B x D) with (1/B) error^T H = weight_gradient, by least squares."""
    batch = error.shape[0]
    return batch * torch.linalg.pinv(error.T, rtol=rtol) @ weight_gradient


class CrossEntropyDemix(Attack):
    """Recovers every sample of a batch in closed form from a dense network trained with cross-entropy.

    Exact when the labels are distinct and B <= C - 1 (G has rank B); with repeated labels G loses rank
    and the solve returns mixtures (with identical labels, copies of the batch mean).
    """

    name: ClassVar[str] = "ce-demix"
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(20, int, minimum=1, help="fixed-point solves re-estimating the probabilities P"),
        "rtol": Param(1e-6, float, minimum=0.0, help="relative singular-value cut-off of the pseudo-inverse"),
    }

    def check(self, view: AttackerView) -> None:
        """Cross-entropy, one gradient step, and a dense network whose first layer reads the image."""
        if view.loss != "cross-entropy":
            raise AttackNotApplicable(f"{self.name}: needs the cross-entropy loss, the client declared {view.loss!r}")
        if view.kind == "delta" and view.local_steps != 1:
            raise AttackNotApplicable(
                f"{self.name}: needs one gradient step; the delta spans {view.local_steps} local steps"
            )
        layers, _ = dense_chain(view.model, self.name)
        if layers[0].module.in_features != prod(view.input_shape):
            raise AttackNotApplicable(f"{self.name}: the first dense layer does not read the flattened image")
        if layers[-1].module.out_features != view.num_classes:
            raise AttackNotApplicable(f"{self.name}: the final dense layer does not produce {view.num_classes} logits")

    def _labels(self, view: AttackerView) -> Tensor:
        if view.labels is not None:
            return view.labels.detach().cpu().long()
        return infer_labels(view, self.name)

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        layers, activations = dense_chain(view.model, self.name)
        rtol = self.params["rtol"]
        labels = self._labels(view)
        batch, classes = labels.shape[0], view.num_classes
        targets = torch.nn.functional.one_hot(labels, classes).to(torch.float64)
        last = layers[-1]
        weight = view.global_params[last.weight_key].detach().cpu().to(torch.float64)
        bias = view.global_params[last.bias_key].detach().cpu().to(torch.float64)
        last_gradient = summed_gradient(view, last.weight_key)
        probabilities = torch.full((batch, classes), 1.0 / classes, dtype=torch.float64)
        solves = 0
        while solves < self.params["iterations"]:
            solves += 1
            features = _solve_inputs(probabilities - targets, last_gradient, rtol)
            updated = torch.softmax(features @ weight.T + bias, dim=1)
            change = float((updated - probabilities).abs().max())
            probabilities = updated
            if change < 1e-12:
                break
        error = probabilities - targets
        features = _solve_inputs(error, last_gradient, rtol)
        misfit = (error.T @ features / batch - last_gradient).norm()
        residual = float(misfit / last_gradient.norm().clamp_min(1e-30))
        rank = int(torch.linalg.matrix_rank(error, rtol=rtol))
        for index in range(len(layers) - 2, -1, -1):
            above = view.global_params[layers[index + 1].weight_key].detach().cpu().to(torch.float64)
            error = activation_slope(activations[index], features) * (error @ above)
            features = _solve_inputs(error, summed_gradient(view, layers[index].weight_key), rtol)
        images = features.to(torch.float32).reshape(batch, *view.input_shape)
        return Reconstruction(
            images=images,
            labels=labels,
            diagnostics={
                "iterations": float(solves),
                "rank": float(rank),
                "residual": residual,
                "distinct_labels": float(labels.unique().numel()),
            },
        )
