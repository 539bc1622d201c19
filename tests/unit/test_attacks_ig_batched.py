"""The per-sample formulation of batched Inverting Gradients against the one-victim path.

``PerSampleLanes`` forms every victim's simulated gradient from one forward and backward of all victims'
dummies (``attacks.simulate.lane_gradients``). Mathematically it is the one-victim objective; these
tests check that in float64, where round-off is far below any mistake, and in float32, against a bound
derived from float32 round-off.

Tolerances. Along the longest chain of the computation every value passes through sums of at most
``CHAIN`` terms in all: for the sigmoid LeNet on 1x28x28 with ``B`` samples a victim, the forward
(26 + 301 + 301 + 589 terms), the backward to the first layer's output (10 + 300 + 75), the weight
gradient (196 B), the same again for the second backward, and the norm of the 13,426 gradient entries.
A float sum of ``n`` terms is off by at most ``n u`` of the sum of their magnitudes (``u``: unit
round-off), and with round-off errors of random sign by about ``sqrt(n) u`` (Higham and Mary 2019;
``LAMBDA = 4`` standard deviations). So the unit-normalised simulated gradient of either path is off by
``delta = CHAIN u`` (float64, worst case) or ``LAMBDA sqrt(CHAIN) u`` (float32), relative to its norm
of one; this takes the sums as well conditioned (their magnitudes and values of one size), which holds
for the sigmoid network at random dummies. The objective ``f = |s - t|^2 / 2`` (unit vectors ``s``,
``t``) then moves by at most ``delta (sqrt(2 f) + delta)`` per path, and its image gradient, a residual
of size ``sqrt(2 f)``, by ``2 delta / sqrt(2 f)`` of its norm.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import metrics
from attacks import AttackerView, InvertingGradients, batch_loss, build_attack
from attacks.inverting_gradients import PerSampleLanes, VmapLanes, _Setup
from attacks.simulate import autograd_gradient, lane_gradients, lane_layers, simulated_update
from defenses import LOSSES
from testbed.runtime.models import build_model
from tests.support.attacks import make_view, mnist_digits

SHAPE = (1, 28, 28)
LENET_PARAMETERS = 13_426
LAMBDA = 4.0


def chain(batch: int) -> int:
    """Terms summed along the longest chain of one objective and image gradient (see the module doc)."""
    forward, backward, weight = 26 + 301 + 301 + 589, 10 + 300 + 75, 196 * batch
    return 2 * (forward + backward + weight) + LENET_PARAMETERS


def unit_error(dtype: torch.dtype, batch: int) -> float:
    """``delta``: how far one path's unit-normalised gradient may lie from the exact one."""
    if dtype == torch.float64:
        return chain(batch) * 2.0**-53
    return LAMBDA * math.sqrt(chain(batch)) * 2.0**-24


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return build_model("lenet", SHAPE, 10, seed=0)


def _views(model: nn.Module, victims: int, batch: int, loss: str = "cross-entropy") -> list[AttackerView]:
    images, labels = mnist_digits([(3 * index + 1) % 10 for index in range(victims * batch)])
    return [
        make_view(model, images[v * batch : (v + 1) * batch], labels[v * batch : (v + 1) * batch], loss=loss)
        for v in range(victims)
    ]


def _in(setup: _Setup, dtype: torch.dtype) -> _Setup:
    """The setup with its model, parameters, target and label targets in ``dtype``."""
    return dataclasses.replace(
        setup,
        model=copy.deepcopy(setup.model).to(dtype),
        params={name: value.to(dtype) for name, value in setup.params.items()},
        target={name: value.to(dtype) for name, value in setup.target.items()},
        one_hot=setup.one_hot.to(dtype),
    )


def _one_victim(attack: InvertingGradients, setup: _Setup, images: Tensor) -> tuple[float, Tensor]:
    """The objective and its image gradient as ``reconstruct`` computes them (plain autograd)."""
    objective = attack._objective(setup, autograd_gradient)
    params = {name: value.clone().requires_grad_(True) for name, value in setup.params.items()}
    images = images.detach().clone().requires_grad_(True)
    value = objective(images, setup.one_hot, params, setup.target)
    (gradient,) = torch.autograd.grad(value, images)
    return float(value.detach()), gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
def test_per_sample_objective_and_image_gradient_equal_the_one_victim_path(
    lenet: nn.Module, dtype: torch.dtype, batch: int
) -> None:
    """At random dummies, every lane's objective and image gradient are its victim's, to round-off.

    float64 shows the two are one function (the bound is about 1e-12 of the unit vectors); float32 shows
    that the batched path is as exact as the one-victim path, both measured against float64.
    """
    attack = build_attack("inverting-gradients", {"tv_weight": 1e-7})
    assert isinstance(attack, InvertingGradients)
    views = _views(lenet, 3, batch)
    setups = [attack._setup(view) for view in views]
    images = torch.rand(len(views), batch, *SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = [_one_victim(attack, _in(setup, torch.float64), images[v]) for v, setup in enumerate(setups)]
    typed = [_in(setup, dtype) for setup in setups]
    layers = lane_layers(typed[0].model)
    assert layers is not None
    lanes = PerSampleLanes(typed, 1, layers, 1e-7, torch.device("cpu"))
    values, gradients = lanes.value_and_gradient(images.to(dtype), None)
    delta = unit_error(dtype, batch)
    for lane, (value, gradient) in enumerate(exact):
        assert abs(float(values[lane]) - value) <= delta * (math.sqrt(2 * value) + delta), (lane, values[lane], value)
        error = float((gradients[lane].double() - gradient).norm() / gradient.norm())
        assert error <= 2 * delta / math.sqrt(2 * value), (lane, error)
        if dtype == torch.float32:  # the one-victim path in float32 keeps to the same bound
            single, single_gradient = _one_victim(attack, typed[lane], images[lane].float())
            assert abs(single - value) <= delta * (math.sqrt(2 * value) + delta)
            assert float((single_gradient.double() - gradient).norm() / gradient.norm()) <= 2 * delta / math.sqrt(
                2 * value
            )


def _flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize(("model_name", "activation"), [("lenet", "sigmoid"), ("cnn", "tanh"), ("mlp", "sigmoid")])
def test_lane_gradients_are_each_lanes_own_gradient(model_name: str, activation: str, loss: str) -> None:
    """In float64, for every loss and the built-in networks (dense, strided and max-pooled convolutional):
    lane ``l``'s row is the batch-mean gradient of its own ``B`` samples, as ``simulated_update`` gives it."""
    model = build_model(model_name, SHAPE, 10, hidden=[16, 8], activation=activation, seed=1).double()
    layers = lane_layers(model)
    assert layers is not None
    generator = torch.Generator().manual_seed(2)
    lanes, batch = 3, 2
    images = torch.rand(lanes, batch, *SHAPE, generator=generator, dtype=torch.float64)
    targets = torch.softmax(torch.randn(lanes, batch, 10, generator=generator, dtype=torch.float64), dim=-1)
    params = {name: value.detach() for name, value in model.named_parameters()}
    mean_loss = batch_loss(LOSSES[loss]())
    rows = lane_gradients(model, layers, mean_loss, params, images, targets, create_graph=False).detach()
    leaves = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    for lane in range(lanes):
        own = simulated_update(
            model,
            batch_loss(LOSSES[loss]()),
            leaves,
            images[lane],
            targets[lane],
            kind="gradient",
            local_steps=1,
            lr=0.1,
            differentiate=autograd_gradient,
        )
        expected = _flat(own).detach()
        # No chain of sums in these networks adds up 10,000 terms (the longest: the cnn's 1,569-input dense
        # layer, forward and back, and a weight gradient over 784 positions x 2 samples): float64 worst case.
        assert float((rows[lane] - expected).norm()) <= 10_000 * 2.0**-53 * float(expected.norm()), lane


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_is_a_mean_so_lanes_add_up(loss: str) -> None:
    """``lane_gradients`` relies on it: L times the loss of all L x B samples is the sum of the lanes' losses."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 3, 10, generator=generator, dtype=torch.float64)
    targets = torch.softmax(torch.randn(5, 3, 10, generator=generator, dtype=torch.float64), dim=-1)
    together = float(batch_loss(LOSSES[loss]())(logits.reshape(15, 10), targets.reshape(15, 10)) * 5)
    apart = sum(float(batch_loss(LOSSES[loss]())(logits[lane], targets[lane])) for lane in range(5))
    assert together == pytest.approx(apart, rel=1e-14)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(784, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.dense(images.flatten(1))


def test_lane_layers_take_only_networks_whose_samples_stay_apart() -> None:
    dense = nn.Linear(784, 10)
    refused = {
        "batch norm": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(2704, 10)),
        "dropout": nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 10)),
        "custom forward": _Custom(),
        "shared layer": nn.Sequential(nn.Flatten(), dense, nn.Sigmoid(), nn.Linear(10, 784), dense),
        "grouped conv": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()),
        "same padding": nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten()),
        "reflect padding": nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
    }
    for reason, model in refused.items():
        assert lane_layers(model) is None, reason
    layers = lane_layers(build_model("lenet", SHAPE, 10, seed=0))
    assert layers is not None
    assert [names["weight"] for names in layers.values()] == ["0.weight", "2.weight", "4.weight", "7.weight"]
    assert lane_layers(build_model("cnn", SHAPE, 10, seed=0)) is not None


def test_auto_takes_per_sample_lanes_where_they_apply(lenet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared parameters and gradient updates: per-sample; a FedAvg delta falls back to vmap."""
    kinds: list[type] = []
    original = InvertingGradients._lane_objective

    def recording(self: InvertingGradients, setups: list[_Setup]) -> object:
        objective = original(self, setups)
        kinds.append(type(objective))
        return objective

    monkeypatch.setattr(InvertingGradients, "_lane_objective", recording)
    attack = build_attack("inverting-gradients", {"iterations": 2})
    attack.reconstruct_many(_views(lenet, 2, 1))
    images, labels = mnist_digits([3, 7, 2, 8])
    deltas = [
        make_view(lenet, images[2 * v : 2 * v + 2], labels[2 * v : 2 * v + 2], kind="delta", local_steps=2, lr=0.01)
        for v in range(2)
    ]
    attack.reconstruct_many(deltas)
    assert kinds == [PerSampleLanes, VmapLanes]
    assert isinstance(attack, InvertingGradients)
    attack.formulation = "per-sample"
    with pytest.raises(ValueError, match="per-sample formulation needs"):
        attack.reconstruct_many(deltas)


def test_victims_beyond_lane_samples_run_in_chunks(lenet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five victims with two restarts of one sample, at most 4 samples a computation: chunks of 2, 2 and 1."""
    sizes: list[int] = []
    original = InvertingGradients._batched

    def counting(self: InvertingGradients, views: list[AttackerView]) -> object:
        sizes.append(len(views))
        return original(self, views)

    monkeypatch.setattr(InvertingGradients, "_batched", counting)
    attack = build_attack("inverting-gradients", {"iterations": 3, "restarts": 2})
    assert isinstance(attack, InvertingGradients)
    attack.lane_samples = 4
    views = _views(lenet, 5, 1)
    results = attack.reconstruct_many(views)
    assert sizes == [2, 2, 1]
    assert [tuple(result.images.shape) for result in results] == [(1, *SHAPE)] * 5


def test_per_sample_lanes_recover_digits(lenet: nn.Module) -> None:
    """The batched path reconstructs: three victims of one digit each and one of two digits, 100 steps."""
    images, labels = mnist_digits([3, 7, 1])
    views = [make_view(lenet, images[v : v + 1], labels[v : v + 1]) for v in range(3)]
    results = build_attack("inverting-gradients", {"iterations": 100}).reconstruct_many(views)
    # Measured: SSIM 0.99 or more for each digit (as the one-victim path at this budget).
    for v, result in enumerate(results):
        assert metrics.ssim(images[v], result.images[0]) > 0.9
        assert result.labels is not None and result.labels.tolist() == [labels[v].item()]
