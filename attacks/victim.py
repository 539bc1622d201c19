"""What the optimisation attacks prepare from a view: parameters, the target update, label targets."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from attacks.label_search import searched_labels
from attacks.losses import SoftTargetLoss, batch_loss
from attacks.simulate import Params, step_sizes
from attacks.view import AttackerView, AttackNotApplicable


def check_simulable(view: AttackerView, attack: str) -> SoftTargetLoss:
    """The client's batch-mean loss (``attacks.losses.batch_loss`` of the view's loss) once the update is known to
    be re-creatable; else AttackNotApplicable."""
    names = [name for name, _ in view.model.named_parameters()]
    missing = [name for name in names if name not in view.update or name not in view.global_params]
    if missing:
        raise AttackNotApplicable(f"{attack}: the update lacks model parameter {missing[0]!r}")
    if view.kind == "delta":
        try:
            step_sizes(view.num_samples, view.local_steps, view.batch_size, view.one_pass)
        except ValueError as exc:
            raise AttackNotApplicable(f"{attack}: {exc}") from None
    return batch_loss(view.loss)


def view_step_sizes(view: AttackerView) -> list[int] | None:
    """The samples of each local step of a delta view (``attacks.simulate.step_sizes``); None for a gradient."""
    if view.kind != "delta":
        return None
    return step_sizes(view.num_samples, view.local_steps, view.batch_size, view.one_pass)


def working_model(view: AttackerView, device: torch.device) -> nn.Module:
    """A private copy of the view's model on ``device`` (its buffers are used; its parameters are not)."""
    return copy.deepcopy(view.model).to(device)


def global_params(view: AttackerView, device: torch.device) -> Params:
    """The round's global parameters in model order, float32 on ``device``, detached."""
    names = [name for name, _ in view.model.named_parameters()]
    return {name: view.global_params[name].detach().to(device=device, dtype=torch.float32) for name in names}


def target_update(view: AttackerView, device: torch.device) -> Params:
    """The client's update in model order, float32 on ``device``."""
    names = [name for name, _ in view.model.named_parameters()]
    return {name: view.update[name].detach().to(device=device, dtype=torch.float32) for name in names}


def label_targets(view: AttackerView, attack: str) -> tuple[Tensor, Tensor]:
    """The labels behind the update (public ones, else counted and, when the count does not fit the final
    layer's update, searched: ``attacks.label_search``) and their one-hot targets (N, C)."""
    labels = view.labels.detach().cpu().long() if view.labels is not None else searched_labels(view, attack)[0]
    return labels, torch.nn.functional.one_hot(labels, view.num_classes).to(torch.float32)


def initial_images(shape: tuple[int, ...], init: str, generator: torch.Generator) -> Tensor:
    """A dummy batch drawn on the CPU from ``generator``: uniform in [0, 1], normal (0.5, 0.25) or 0.5."""
    if init == "uniform":
        return torch.rand(shape, generator=generator)
    if init == "normal":
        return 0.5 + 0.25 * torch.randn(shape, generator=generator)
    return torch.full(shape, 0.5)
