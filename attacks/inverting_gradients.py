"""Inverting Gradients (Geiping et al. 2020): cosine matching + total variation, signed Adam, box [0, 1].

``reconstruct`` runs one victim with plain autograd. ``reconstruct_many`` runs every victim and every
restart as one lane of a single ``torch.func.vmap`` computation (one Adam over the stacked dummies),
so a GPU stays busy; the two paths compute the same thing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from attacks.base import Attack
from attacks.layers import final_dense
from attacks.losses import SoftTargetLoss
from attacks.params import Param
from attacks.simulate import (
    Differentiate,
    Params,
    autograd_gradient,
    cosine_distance,
    func_gradient,
    simulated_update,
    total_variation,
)
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
MILESTONES = (3 / 8, 5 / 8, 7 / 8)


@dataclass(frozen=True)
class _Setup:
    """Everything one lane's objective needs besides the dummy images."""

    view: AttackerView
    model: nn.Module
    loss: SoftTargetLoss
    params: Params
    target: Params
    labels: Tensor
    one_hot: Tensor


class InvertingGradients(Attack):
    """Dummy images optimised to minimise 1 - cos(simulated update, real update) + tv_weight * TV.

    Adam steps on the sign of the gradient, pixels projected to [0, 1] after each step, the step size
    divided by 10 at 3/8, 5/8 and 7/8 of the iterations; of ``restarts`` runs the lowest final objective
    wins (a NaN objective counts as +inf). Labels are the public ones or inferred. Delta views unroll
    the declared local SGD steps.
    """

    name: ClassVar[str] = "inverting-gradients"
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(1000, int, minimum=1, help="Adam steps per restart"),
        "lr": Param(0.1, float, minimum=0.0, strictly_above=True, help="initial Adam step size"),
        "tv_weight": Param(1e-7, float, minimum=0.0, help="weight of the total-variation prior"),
        "restarts": Param(1, int, minimum=1, help="independent initialisations; the best objective is kept"),
        "seed": Param(0, int, minimum=0, help="seed of the initialisations"),
        "init": Param("uniform", str, choices=INITS, help="dummy image initialisation"),
    }

    def check(self, view: AttackerView) -> None:
        """The loss must be one the attack can re-create; inferred labels need a final dense layer."""
        check_simulable(view, self.name)
        if view.labels is None:
            final_dense(view.model, view.num_classes, self.name)

    def _setup(self, view: AttackerView) -> _Setup:
        loss = check_simulable(view, self.name)
        labels, one_hot = label_targets(view, self.name)
        return _Setup(
            view=view,
            model=working_model(view, self.device),
            loss=loss,
            params=global_params(view, self.device),
            target=target_update(view, self.device),
            labels=labels,
            one_hot=one_hot.to(self.device),
        )

    def _initial(self, view: AttackerView) -> list[Tensor]:
        """The dummy batch of every restart, drawn in order from one generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(self.params["seed"])
        shape = (view.num_samples, *view.input_shape)
        return [initial_images(shape, self.params["init"], generator) for _ in range(self.params["restarts"])]

    def _objective(
        self, setup: _Setup, differentiate: Differentiate
    ) -> Callable[[Tensor, Tensor, Params, Params], Tensor]:
        view = setup.view

        def objective(images: Tensor, one_hot: Tensor, params: Params, target: Params) -> Tensor:
            simulated = simulated_update(
                setup.model,
                setup.loss,
                params,
                images,
                one_hot,
                kind=view.kind,
                local_steps=view.local_steps,
                lr=view.lr,
                differentiate=differentiate,
            )
            return cosine_distance(simulated, target) + self.params["tv_weight"] * total_variation(images)

        return objective

    def _optimise(self, images: Tensor, signed_gradient: Callable[[Tensor], Tensor]) -> None:
        """Adam on the sign of the gradient with the step-size schedule and the [0, 1] box, in place."""
        iterations = self.params["iterations"]
        optimiser = torch.optim.Adam([images], lr=self.params["lr"])
        milestones = [int(iterations * fraction) for fraction in MILESTONES]
        for step in range(iterations):
            optimiser.param_groups[0]["lr"] = self.params["lr"] * 0.1 ** sum(step >= m for m in milestones)
            images.grad = signed_gradient(images.detach())
            optimiser.step()
            with torch.no_grad():
                images.clamp_(0, 1)

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        setup = self._setup(view)
        objective = self._objective(setup, autograd_gradient)
        params = {name: value.clone().requires_grad_(True) for name, value in setup.params.items()}

        def signed_gradient(images: Tensor) -> Tensor:
            images = images.requires_grad_(True)
            value = objective(images, setup.one_hot, params, setup.target)
            return torch.autograd.grad(value, images)[0].sign()

        finals: list[tuple[float, Tensor]] = []
        for start in self._initial(view):
            images = start.to(self.device).requires_grad_(True)
            self._optimise(images, signed_gradient)
            final = float(objective(images.detach(), setup.one_hot, params, setup.target).detach())
            finals.append((math.inf if math.isnan(final) else final, images.detach()))
        best = min(range(len(finals)), key=lambda index: finals[index][0])
        return self._result(setup, finals[best][1], finals[best][0], best)

    def _result(self, setup: _Setup, images: Tensor, objective: float, restart: int) -> Reconstruction:
        return Reconstruction(
            images=images.to(torch.float32).cpu(),
            labels=setup.labels,
            diagnostics={
                "iterations": float(self.params["iterations"]),
                "objective": objective,
                "best_restart": float(restart),
            },
        )

    def reconstruct_many(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """All victims and restarts in one batched computation; same result as ``reconstruct`` per view.

        Views that share the architecture, update kind, loss, local steps, learning rate and shapes (the
        audit of one client group in one round does) form one batch; their global parameters are shared
        when equal, else stacked per victim. A view alone in its group takes the (faster) one-victim path.
        """
        for view in views:
            self.check(view)
        results: dict[int, Reconstruction] = {}
        for members in _compatible_groups(views):
            if len(members) == 1:
                results[members[0]] = self.reconstruct(views[members[0]])
                continue
            with torch.enable_grad():
                batch = self._batched([views[i] for i in members])
            for index, result in zip(members, batch, strict=True):
                results[index] = result
        return [results[index] for index in range(len(views))]

    def _batched(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        start = time.perf_counter()
        setups = [self._setup(view) for view in views]
        restarts = self.params["restarts"]
        lane_images = torch.stack([image for view in views for image in self._initial(view)]).to(self.device)
        lane_one_hot = torch.stack([s.one_hot for s in setups]).repeat_interleave(restarts, dim=0)
        lane_target = {
            name: torch.stack([s.target[name] for s in setups]).repeat_interleave(restarts, dim=0)
            for name in setups[0].target
        }
        shared = all(torch.equal(s.params[name], setups[0].params[name]) for s in setups for name in s.params)
        params = setups[0].params
        if not shared:
            params = {
                name: torch.stack([s.params[name] for s in setups]).repeat_interleave(restarts, dim=0)
                for name in params
            }
        objective = self._objective(setups[0], func_gradient)
        in_dims = (0, 0, None if shared else 0, 0)
        lane_step = vmap(grad_and_value(objective), in_dims=in_dims)
        lane_value = vmap(objective, in_dims=in_dims)

        def signed_gradient(images: Tensor) -> Tensor:
            gradient, _ = lane_step(images, lane_one_hot, params, lane_target)
            return gradient.sign()

        images = lane_images.requires_grad_(True)
        self._optimise(images, signed_gradient)
        finals = lane_value(images.detach(), lane_one_hot, params, lane_target).detach().cpu()
        finals = torch.nan_to_num(finals, nan=math.inf)
        seconds = (time.perf_counter() - start) / len(views)
        results = []
        for index, setup in enumerate(setups):
            lanes = finals[index * restarts : (index + 1) * restarts]
            best = int(torch.argmin(lanes))
            result = self._result(setup, images.detach()[index * restarts + best], float(lanes[best]), best)
            result.diagnostics["seconds"] = seconds
            results.append(result)
        return results


def _compatible_groups(views: Sequence[AttackerView]) -> list[list[int]]:
    """Indices of the views grouped by everything a batched inversion must share, in first-seen order."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, view in enumerate(views):
        architecture = tuple((name, tuple(p.shape)) for name, p in view.model.named_parameters())
        key = (
            type(view.model),
            architecture,
            view.kind,
            view.loss,
            view.local_steps,
            view.lr,
            view.batch_size,
            view.num_samples,
            view.input_shape,
            view.num_classes,
        )
        groups.setdefault(key, []).append(index)
    return list(groups.values())
