"""Model registry: output shapes, seeded initialisation, dense layers where the attacks expect them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from testbed.config.schema import BUILT_IN_MODELS, ModelConfig
from testbed.runtime.models import UnknownModelError, build_model, model_for


@pytest.mark.parametrize("name", BUILT_IN_MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_name_the_schema_allows_builds(name: str, shape: tuple[int, int, int]) -> None:
    """The schema's list is the one list of built-in models: each name it accepts builds, with its logits."""
    model = model_for(ModelConfig(name=name, hidden=[32, 16]), shape, 10, seed=0)
    assert model(torch.rand(5, *shape)).shape == (5, 10)


def test_seed_fixes_the_initial_weights_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = build_model("lenet", (1, 28, 28), 10, seed=7)
    assert torch.equal(torch.rand(1), before)
    second = build_model("lenet", (1, 28, 28), 10, seed=7)
    other = build_model("lenet", (1, 28, 28), 10, seed=8)
    named = zip(first.named_parameters(), second.named_parameters(), other.named_parameters(), strict=True)
    for (_, a), (_, b), (_, c) in named:
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_architectures() -> None:
    softmax = build_model("softmax", (1, 28, 28), 10)
    assert [type(m) for m in softmax] == [nn.Flatten, nn.Linear]
    mlp = build_model("mlp", (1, 28, 28), 10, hidden=[256, 64], activation="tanh")
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [256, 64, 10]
    assert sum(isinstance(m, nn.Tanh) for m in mlp) == 2
    lenet = build_model("lenet", (1, 28, 28), 10)
    assert sum(isinstance(m, nn.Sigmoid) for m in lenet) == 3
    assert isinstance(lenet[-1], nn.Linear) and lenet[-1].in_features == 12 * 7 * 7


def test_unknown_names() -> None:
    with pytest.raises(UnknownModelError, match="allowed: softmax, mlp, lenet, cnn"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(UnknownModelError, match=r"model\.activation"):
        build_model("mlp", (1, 28, 28), 10, activation="gelu")


@pytest.mark.parametrize(("name", "default", "count"), [("lenet", nn.Sigmoid, 3), ("cnn", nn.ReLU, 3)])
def test_convolutional_models_honour_their_activation(name: str, default: type[nn.Module], count: int) -> None:
    from testbed.config.schema import ModelConfig
    from testbed.report.data import describe_model
    from testbed.runtime.models import model_for

    assert sum(isinstance(m, default) for m in build_model(name, (1, 28, 28), 10)) == count
    tanh = model_for(ModelConfig(name=name, activation="tanh"), (1, 28, 28), 10)
    assert sum(isinstance(m, nn.Tanh) for m in tanh) == count
    assert not any(isinstance(m, nn.Sigmoid | nn.ReLU) for m in tanh)
    resolved = ModelConfig(name=name)  # an unnamed activation resolves to the model's default, as reports show it
    assert resolved.activation == {nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}[default]
    assert describe_model({"model.name": name, "model.activation": "tanh"}) == f"{name} tanh"
    assert describe_model({"model.name": "softmax", "model.activation": "None"}) == "softmax"


def test_report_labels_a_dp_sgd_group_by_its_parameters() -> None:
    from testbed.report.data import describe_defence

    spec = {"dp": {"clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}, "loss": "mse"}
    assert describe_defence(spec) == "dp(clip=1.0, noise_multiplier=1.1, delta=1e-05, accountant=rdp) / mse"


def test_dlg_init_draws_every_parameter_uniform_and_seeded() -> None:
    model = build_model("lenet", (1, 28, 28), 10, init="dlg", seed=3)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.abs().max() <= 0.5
    # uniform(-0.5, 0.5) has standard deviation 1/sqrt(12); over n draws the sample deviation's own
    # standard error is about 0.5 * sqrt(0.8 / n) (excess kurtosis -1.2), so 6 of them is a safe band
    expected = 12**-0.5
    assert abs(values.std().item() - expected) < 6 * expected * (0.2 / values.numel()) ** 0.5
    again = build_model("lenet", (1, 28, 28), 10, init="dlg", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    default = build_model("lenet", (1, 28, 28), 10, seed=3)
    assert torch.cat([p.detach().flatten() for p in default.parameters()]).abs().max() < 0.5 * values.abs().max()
    with pytest.raises(UnknownModelError, match=r"model\.init"):
        build_model("lenet", (1, 28, 28), 10, init="xavier")
