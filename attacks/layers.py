"""Finding the layers analytic attacks read, and turning an update into gradient-like tensors."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn

from attacks.view import AttackerView, AttackNotApplicable

ELEMENTWISE_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity)
SHAPE_ONLY = (nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class DenseLayer:
    """A ``nn.Linear`` of the model with the update keys of its weight and bias."""

    module_name: str
    module: nn.Linear
    weight_key: str
    bias_key: str


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules without children, in registration (forward, for Sequential) order."""
    return [(name, module) for name, module in model.named_modules() if not list(module.children())]


def _dense(name: str, module: nn.Linear, attack: str) -> DenseLayer:
    if module.bias is None:
        raise AttackNotApplicable(f"{attack}: dense layer {name!r} has no bias")
    prefix = f"{name}." if name else ""
    return DenseLayer(name, module, f"{prefix}weight", f"{prefix}bias")


def first_dense_on_image(model: nn.Module, input_shape: tuple[int, ...], attack: str) -> DenseLayer:
    """The first dense layer, provided its input is the flattened image; else AttackNotApplicable."""
    for name, module in leaf_modules(model):
        if isinstance(module, nn.Linear):
            if module.in_features != prod(input_shape):
                raise AttackNotApplicable(
                    f"{attack}: first dense layer {name!r} takes {module.in_features} inputs, "
                    f"not the {prod(input_shape)} pixels of the image"
                )
            return _dense(name, module, attack)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise AttackNotApplicable(f"{attack}: first dense layer follows convolutions; its input is not the image")
        if not isinstance(module, SHAPE_ONLY):
            raise AttackNotApplicable(
                f"{attack}: first dense layer follows {type(module).__name__}; its input is not the image"
            )
    raise AttackNotApplicable(f"{attack}: the model has no dense layer")


def final_dense(model: nn.Module, num_classes: int, attack: str) -> DenseLayer:
    """The last module, which must be a dense layer producing the ``num_classes`` logits."""
    leaves = leaf_modules(model)
    if not leaves or not isinstance(leaves[-1][1], nn.Linear):
        raise AttackNotApplicable(f"{attack}: the model does not end in a dense layer producing the logits")
    name, module = leaves[-1]
    assert isinstance(module, nn.Linear)
    if module.out_features != num_classes:
        raise AttackNotApplicable(
            f"{attack}: final dense layer has {module.out_features} outputs, expected {num_classes} classes"
        )
    return _dense(name, module, attack)


def dense_chain(model: nn.Module, attack: str) -> tuple[list[DenseLayer], list[nn.Module]]:
    """A Flatten -> Linear -> activation -> ... -> Linear network as (layers, activations between them).

    Raises AttackNotApplicable for anything else (convolutions, pooling, normalisation, dropout).
    """
    leaves = leaf_modules(model)
    layers: list[DenseLayer] = []
    activations: list[nn.Module] = []
    for position, (name, module) in enumerate(leaves):
        if position == 0 and isinstance(module, nn.Flatten):
            continue
        if position > 0 and isinstance(module, nn.Linear):
            if len(layers) > len(activations):
                activations.append(nn.Identity())
            layers.append(_dense(name, module, attack))
        elif isinstance(module, ELEMENTWISE_ACTIVATIONS) and len(layers) > len(activations):
            activations.append(module)
        else:
            raise AttackNotApplicable(
                f"{attack}: needs a dense network (Flatten, Linear, elementwise activations); "
                f"found {type(module).__name__} at {name!r}"
            )
    if not layers or len(activations) != len(layers) - 1:
        raise AttackNotApplicable(f"{attack}: needs a dense network that ends in a Linear layer")
    return layers, activations


def activation_slope(activation: nn.Module, output: Tensor, zero_tol: float = 1e-6) -> Tensor:
    """The activation's derivative at each unit, computed from the activation's (recovered) OUTPUT.

    For ReLU-like units an output within ``zero_tol`` times the row's largest magnitude counts as zero,
    so that round-off in a recovered activation does not switch a unit on.
    """
    if isinstance(activation, (nn.ReLU, nn.LeakyReLU)):
        active = output > zero_tol * output.abs().amax(dim=-1, keepdim=True)
        slope = activation.negative_slope if isinstance(activation, nn.LeakyReLU) else 0.0
        return torch.where(active, torch.ones_like(output), torch.full_like(output, slope))
    if isinstance(activation, nn.Sigmoid):
        return output * (1 - output)
    if isinstance(activation, nn.Tanh):
        return 1 - output**2
    return torch.ones_like(output)


def summed_gradient(view: AttackerView, key: str) -> Tensor:
    """The update of parameter ``key`` as a gradient: itself, or ``-delta / lr`` for a weight delta.

    For a delta after several local steps this is the sum of the per-step batch-mean gradients.
    """
    if key in view.factors:
        left, right = gradient_factors(view, key)
        return left @ right.T
    update = view.update[key].detach().to(torch.float64).cpu()
    if view.kind == "delta":
        return -update / view.lr
    return update


def gradient_rows(view: AttackerView, key: str, rows: Tensor) -> Tensor:
    """Rows ``rows`` of ``summed_gradient(view, key)`` (a 2-d parameter), computed for those rows only.

    Elementwise the same operations as ``summed_gradient``, so the values are identical (for a weight held
    as a thin SVD: the same rows of L times V^T, equal to round-off).
    """
    if key in view.factors:
        left, right = gradient_factors(view, key)
        return left[rows.to(left.device)] @ right.T
    update = view.update[key].detach()[rows.to(view.update[key].device)].to(torch.float64).cpu()
    if view.kind == "delta":
        return -update / view.lr
    return update


def gradient_factors(view: AttackerView, key: str) -> tuple[Tensor, Tensor]:
    """``summed_gradient(view, key)`` as (L, V) with L @ V.T the gradient and V orthonormal, for a weight
    the view holds as a thin SVD (``AttackerView.factors``); float64 on the CPU."""
    left, right = (part.detach().to(torch.float64).cpu() for part in view.factors[key])
    return (-left / view.lr if view.kind == "delta" else left), right
