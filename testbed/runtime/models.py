"""Model registry: the architectures the gradient-inversion literature studies, and the user's own.

Every model maps an input of shape ``input_shape`` (C x H x W) to ``num_classes`` logits. The built-in ones
are plain ``torch.nn`` layers, so attacks can find their dense layers by walking ``named_modules()``; a
``model.name`` of the form ``package.module:callable`` is built by ``testbed.runtime.user_models``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from math import prod
from typing import TYPE_CHECKING

import torch
from torch import nn

from defenses.import_path import is_import_path
from testbed.config.schema import BUILT_IN_MODELS, DEFAULT_ACTIVATIONS
from testbed.runtime.user_models import build_user_model

if TYPE_CHECKING:
    from testbed.config.schema import ModelConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


class UnknownModelError(ValueError):
    """Raised for a model name or option that the registry does not know."""


def softmax_regression(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """One dense layer on the flattened input (multinomial logistic regression)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def _activation(activation: str) -> Callable[[], nn.Module]:
    if activation not in ACTIVATIONS:
        raise UnknownModelError(
            f"model.activation: unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation]


def mlp(
    input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256,), activation: str = "relu"
) -> nn.Module:
    """A fully connected network with the given hidden widths and activation."""
    layer = _activation(activation)
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), layer()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet(input_shape: Sequence[int], num_classes: int, activation: str = "sigmoid") -> nn.Module:
    """The LeNet of the DLG / iDLG papers: three 5x5 convolutions (12 channels) and one dense layer.

    Works for 1x28x28 (MNIST) and 3x32x32 (CIFAR-10) inputs; strides 2, 2, 1 with padding 2. The papers
    use sigmoid (the default); ``activation`` swaps it for relu or tanh.
    """
    channels, height, width = input_shape
    layer = _activation(activation)
    body = nn.Sequential(
        nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
        layer(),
        nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
        layer(),
        nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
        layer(),
        nn.Flatten(),
    )
    with torch.no_grad():
        features = body(torch.zeros(1, channels, height, width)).shape[1]
    return nn.Sequential(*body, nn.Linear(features, num_classes))


def small_cnn(input_shape: Sequence[int], num_classes: int, activation: str = "relu") -> nn.Module:
    """A small convolutional network (ReLU by default): two conv + max-pool blocks, then two dense layers."""
    channels, height, width = input_shape
    layer = _activation(activation)
    body = nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        layer(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        layer(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        features = body(torch.zeros(1, channels, height, width)).shape[1]
    return nn.Sequential(*body, nn.Linear(features, 64), layer(), nn.Linear(64, num_classes))


INITS = ("default", "dlg")


def dlg_init(model: nn.Module) -> nn.Module:
    """Draw every parameter of ``model`` from uniform(-0.5, 0.5), the initialisation of the DLG code
    (Zhu et al. 2019) for its LeNet; with sigmoid activations it is what lets plain SGD leave chance."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.5, 0.5)
    return model


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """With ``seed``, torch's global generator starts from it and is restored afterwards."""
    if seed is None:
        yield
        return
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (256,),
    activation: str | None = None,
    init: str = "default",
    seed: int | None = None,
) -> nn.Module:
    """Build a registered model; with ``seed`` its initial weights depend only on that seed.

    ``activation`` None takes the model's default (``DEFAULT_ACTIVATIONS``); softmax regression has none.
    ``init`` "dlg" redraws every parameter with ``dlg_init``; "default" keeps torch's layer initialisation.
    """
    if len(input_shape) != 3:
        raise UnknownModelError(f"model: input shape must be C x H x W, got {tuple(input_shape)}")
    if init not in INITS:
        raise UnknownModelError(f"model.init: unknown initialisation {init!r}; allowed: {', '.join(INITS)}")
    chosen = activation or DEFAULT_ACTIVATIONS.get(name, "relu")
    with _seeded(seed):
        model: nn.Module
        if name == "softmax":
            model = softmax_regression(input_shape, num_classes)
        elif name == "mlp":
            model = mlp(input_shape, num_classes, hidden, chosen)
        elif name == "lenet":
            model = lenet(input_shape, num_classes, chosen)
        elif name == "cnn":
            model = small_cnn(input_shape, num_classes, chosen)
        else:
            raise UnknownModelError(f"model.name: unknown model {name!r}; allowed: {', '.join(BUILT_IN_MODELS)}")
        return dlg_init(model) if init == "dlg" else model


def model_for(config: ModelConfig, input_shape: Sequence[int], num_classes: int, seed: int | None = None) -> nn.Module:
    """The model a topology's ``model`` block describes, for the data set's input shape and classes.

    A user's model (``model.name`` an import path) raises ``UserModelError`` when it cannot be built.
    """
    if is_import_path(config.name):
        with _seeded(seed):
            model = build_user_model(config, input_shape, num_classes)
            return dlg_init(model) if config.init == "dlg" else model
    return build_model(
        config.name,
        input_shape,
        num_classes,
        hidden=config.hidden,
        activation=config.activation,
        init=config.init,
        seed=seed,
    )
