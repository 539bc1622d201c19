"""Deep Leakage from Gradients (Zhu et al. 2019): match the update with L2 distance and L-BFGS.

The budget is that of the original code: an outer loop of ``iterations`` L-BFGS steps, each running up
to ``inner_iterations`` L-BFGS iterations (torch's ``max_iter``), on one optimiser whose curvature
history carries over between outer steps. An objective plateau stops the outer loop early.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.early_stop import Plateau
from attacks.layers import final_dense
from attacks.params import Param
from attacks.simulate import autograd_gradient, simulated_update, squared_distance
from attacks.victim import (
    check_simulable,
    global_params,
    initial_images,
    label_targets,
    target_update,
    view_step_sizes,
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
    best (lowest) objective seen is kept; images come back clipped to [0, 1]. The run stops after
    ``patience`` outer steps in which the best objective fell by less than ``min_delta`` (relative).
    """

    name: ClassVar[str] = "dlg"
    cost: ClassVar[str] = "optimisation"
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(300, int, minimum=1, help="outer L-BFGS steps (the original code's loop)"),
        "inner_iterations": Param(20, int, minimum=1, help="L-BFGS iterations per outer step (torch's max_iter)"),
        "lr": Param(1.0, float, minimum=0.0, strictly_above=True, help="L-BFGS step length"),
        "seed": Param(0, int, minimum=0, help="seed of the dummy images and label logits"),
        "init": Param("uniform", str, choices=INITS, help="dummy image initialisation"),
        "label_mode": Param("soft", str, choices=("soft", "infer"), help="soft (DLG) or inferred (iDLG) labels"),
        "patience": Param(10, int, minimum=0, help="outer steps without a min_delta improvement (0: no early stop)"),
        "min_delta": Param(0.01, float, minimum=0.0, maximum=0.5, help="relative improvement that counts"),
    }

    def check(self, view: AttackerView) -> None:
        """The loss must be one the attack can re-create; inferred labels need a final dense layer."""
        check_simulable(view, self.name)
        if view.labels is None and self.params["label_mode"] == "infer":
            final_dense(view.model, view.num_classes, self.name)

    def trace(self, view: AttackerView, checkpoints: Sequence[int]) -> list[Reconstruction]:
        """The reconstruction as it stood after each of ``checkpoints`` outer steps of ONE run.

        L-BFGS has no schedule tied to the budget, so the state after ``k`` outer steps of a longer run
        is what a run with ``iterations = k`` returns (early stop included): one run gives a whole
        budget curve. Checkpoints must lie in 1..``iterations``; ``seconds`` is the time up to each.
        """
        if any(not 1 <= point <= self.params["iterations"] for point in checkpoints):
            raise ValueError(f"checkpoints must lie in 1..{self.params['iterations']}, got {list(checkpoints)}")
        self.check(view)
        with torch.enable_grad():
            return self._run(view, sorted(set(checkpoints)))

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        return self._run(view, [self.params["iterations"]])[-1]

    def _run(self, view: AttackerView, checkpoints: Sequence[int]) -> list[Reconstruction]:
        start = time.perf_counter()
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
        sizes = view_step_sizes(view)

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
                sizes=sizes,
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
            max_iter=self.params["inner_iterations"],
            history_size=100,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )
        plateau = Plateau(1, self.params["patience"], self.params["min_delta"], torch.device("cpu"))
        results: list[Reconstruction] = []
        pending = list(checkpoints)
        outer = 0
        stopped = False
        while pending:
            if not stopped:
                optimiser.step(closure)
                outer += 1
                plateau.observe(torch.tensor([best.objective]))
                stopped = bool(plateau.check(outer)[0])
            if stopped or outer == pending[0]:
                pending.pop(0)
                labels = torch.argmax(best.label_logits, dim=-1).cpu() if known_labels is None else known_labels
                results.append(
                    Reconstruction(
                        images=best.images.clamp(0, 1).to(torch.float32).cpu(),
                        labels=labels,
                        diagnostics={
                            "iterations": float(self.params["iterations"]),
                            "outer_iterations_run": float(outer),
                            "iterations_run": float(optimiser.state[images].get("n_iter", 0)),
                            "evaluations": float(evaluations),
                            "objective": best.objective,
                            "seconds": time.perf_counter() - start,
                        },
                    )
                )
        return results
