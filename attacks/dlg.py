"""Deep Leakage from Gradients (Zhu et al. 2019): match the update with L2 distance and L-BFGS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.layers import final_dense
from attacks.params import Param
from attacks.simulate import autograd_gradient, simulated_update, squared_distance
from attacks.victim import (
    check_simulable,
    global_params,
    initial_images,
    label_targets,
    target_update,
    working_model,
)
from attacks.view import AttackerView, Reconstruction

INITS = ("uniform", "normal", "constant")


@dataclass
class _Best:
    """The lowest objective seen so far and the variables that gave it."""

    objective: float
    images: Tensor
    label_logits: Tensor


class DeepLeakage(Attack):
    """Optimises dummy images (and, without known labels, soft labels) so their update matches the real one.

    ``label_mode="soft"`` is DLG's joint optimisation of label logits; ``"infer"`` fixes the labels by
    label inference first (iDLG). Public labels in the view are always used. Delta views unroll the
    declared local SGD steps and are compared in gradient units (divided by the learning rate). The
    best (lowest) objective seen is kept; images come back clipped to [0, 1].
    """

    name: ClassVar[str] = "dlg"
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(300, int, minimum=1, help="L-BFGS iterations (each may evaluate several times)"),
        "lr": Param(1.0, float, minimum=0.0, strictly_above=True, help="L-BFGS step length"),
        "seed": Param(0, int, minimum=0, help="seed of the dummy images and label logits"),
        "init": Param("uniform", str, choices=INITS, help="dummy image initialisation"),
        "label_mode": Param("soft", str, choices=("soft", "infer"), help="soft (DLG) or inferred (iDLG) labels"),
    }

    def check(self, view: AttackerView) -> None:
        """The loss must be one the attack can re-create; inferred labels need a final dense layer."""
        check_simulable(view, self.name)
        if view.labels is None and self.params["label_mode"] == "infer":
            final_dense(view.model, view.num_classes, self.name)

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        loss = check_simulable(view, self.name)
        device = self.device
        model = working_model(view, device)
        params = {name: value.requires_grad_(True) for name, value in global_params(view, device).items()}
        target = target_update(view, device)
        generator = torch.Generator().manual_seed(self.params["seed"])
        shape = (view.num_samples, *view.input_shape)
        images = initial_images(shape, self.params["init"], generator).to(device).requires_grad_(True)
        label_logits = torch.randn((view.num_samples, view.num_classes), generator=generator).to(device)
        soft = view.labels is None and self.params["label_mode"] == "soft"
        variables = [images, label_logits.requires_grad_(True)] if soft else [images]
        known_labels, one_hot = (None, None) if soft else label_targets(view, self.name)
        best = _Best(math.inf, images.detach().clone(), label_logits.detach().clone())
        evaluations = 0
        scale = 1.0 if view.kind == "gradient" else 1.0 / view.lr**2

        def closure() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            targets = torch.softmax(label_logits, dim=-1) if one_hot is None else one_hot.to(device)
            simulated = simulated_update(
                model,
                loss,
                params,
                images,
                targets,
                kind=view.kind,
                local_steps=view.local_steps,
                lr=view.lr,
                differentiate=autograd_gradient,
            )
            objective = squared_distance(simulated, target) * scale
            value = float(objective.detach())
            if value < best.objective:
                best.objective = value
                best.images = images.detach().clone()
                best.label_logits = label_logits.detach().clone()
            for variable, grad in zip(variables, torch.autograd.grad(objective, variables), strict=True):
                variable.grad = grad
            return objective

        optimiser = torch.optim.LBFGS(
            variables,
            lr=self.params["lr"],
            max_iter=self.params["iterations"],
            history_size=100,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )
        optimiser.step(closure)
        labels = torch.argmax(best.label_logits, dim=-1).cpu() if known_labels is None else known_labels
        return Reconstruction(
            images=best.images.clamp(0, 1).to(torch.float32).cpu(),
            labels=labels,
            diagnostics={
                "iterations": float(optimiser.state[images].get("n_iter", 0)),
                "evaluations": float(evaluations),
                "objective": best.objective,
            },
        )
