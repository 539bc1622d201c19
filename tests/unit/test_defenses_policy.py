"""Building policies from YAML specs: defaults, spellings, user parts by import path, errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor

from defenses import (
    LOSSES,
    ClipL2,
    CrossEntropy,
    DefenceConfigError,
    GaussianNoise,
    IdenticalLabels,
    LabelCount,
    LabelSmoothing,
    Loss,
    Prune,
    Quantize,
    RandomBatching,
    build_policy,
    register,
    registered,
)
from tests.support.defence_plugins import HingeLoss, MyTransform


def test_missing_keys_default_to_random_cross_entropy_and_no_transforms() -> None:
    for spec in (None, {}, {"batching": None, "loss": None, "update": None}):
        policy = build_policy(spec)
        assert policy.batching == RandomBatching() and policy.loss == CrossEntropy() and policy.transforms == ()


def test_the_documented_examples_build() -> None:
    policy = build_policy(
        {
            "batching": "identical-labels",
            "loss": {"name": "label-smoothing", "epsilon": 0.1},
            "update": [{"clip-l2": {"norm": 1.0}}, {"gaussian-noise": {"sigma": 0.01}}],
        }
    )
    assert policy.batching == IdenticalLabels()
    assert policy.loss == LabelSmoothing(0.1)
    assert policy.transforms == (ClipL2(1.0), GaussianNoise(sigma=0.01))
    policy = build_policy({"batching": {"name": "label-count", "k": 3}, "update": [{"prune": {"keep": 0.1}}]})
    assert policy.batching == LabelCount(3) and policy.transforms == (Prune(0.1),)


def test_inline_main_parameters_and_alternative_spellings() -> None:
    policy = build_policy(
        {
            "batching": {"label_count": 4},
            "loss": {"Label-Smoothing": 0.2},
            "update": [
                {"clip_l2": 1},
                {"gaussian_noise": "1e-3"},
                {"gaussian-noise": {"noise-multiplier": 1.1, "clip-norm": 2.0}},
                {"name": "quantize", "bits": 4, "rounding": "deterministic"},
                {"prune": 0.5},
            ],
        }
    )
    assert policy.batching == LabelCount(4)
    assert policy.loss == LabelSmoothing(0.2)
    assert policy.transforms == (
        ClipL2(1.0),
        GaussianNoise(sigma=0.001),
        GaussianNoise(noise_multiplier=1.1, clip_norm=2.0),
        Quantize(4, "deterministic"),
        Prune(0.5),
    )
    assert isinstance(policy.transforms[0].norm, float)


def test_a_yaml_block_with_a_user_part_and_exponent_numbers_builds() -> None:
    text = """
    batching: {distinct_labels: null}
    loss: sigmoid-bce
    update:
      - tests.support.defence_plugins:MyTransform: 0.5
      - {gaussian_noise: 1e-3}
    """
    policy = build_policy(yaml.safe_load(text))
    assert policy.describe() == {
        "batching": {"name": "distinct-labels"},
        "loss": {"name": "sigmoid-bce"},
        "update": [
            {"name": "tests.support.defence_plugins:MyTransform", "factor": 0.5},
            {"name": "gaussian-noise", "sigma": 0.001, "noise_multiplier": None, "clip_norm": None},
        ],
    }


def test_describe_is_plain_data_with_names_and_parameters() -> None:
    policy = build_policy({"batching": {"label-count": 2}, "loss": "mse", "update": [{"quantize": 6}]})
    assert policy.describe() == {
        "batching": {"name": "label-count", "k": 2},
        "loss": {"name": "mse"},
        "update": [{"name": "quantize", "bits": 6, "rounding": "stochastic"}],
    }


@pytest.mark.parametrize(
    "path", ["tests.support.defence_plugins:MyTransform", "tests.support.defence_plugins.MyTransform"]
)
def test_user_transform_loads_by_import_path(path: str) -> None:
    policy = build_policy({"update": [{path: {"factor": 3.0}}, {"name": path, "factor": 0.5}, {path: 2}]})
    assert policy.transforms == (MyTransform(3.0), MyTransform(0.5), MyTransform(2.0))
    update = {"w": torch.ones(2, 3)}
    result = policy.transform(update, [torch.Generator(), torch.Generator()])
    torch.testing.assert_close(result["w"], torch.full((2, 3), 3.0))
    assert policy.describe()["update"][0] == {"name": "tests.support.defence_plugins:MyTransform", "factor": 3.0}


def test_user_loss_written_as_a_plain_class_loads_by_path() -> None:
    policy = build_policy({"loss": {"name": "tests.support.defence_plugins:HingeLoss", "margin": 0.5}})
    assert isinstance(policy.loss, HingeLoss) and policy.loss.margin == 0.5
    assert policy.describe()["loss"] == {"name": "test-hinge", "margin": 0.5}
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(policy.loss.per_sample(logits, torch.tensor([0])), torch.tensor([0.0]))
    torch.testing.assert_close(policy.loss.per_sample(logits, torch.tensor([2])), torch.tensor([4.0]))


@pytest.fixture
def clean_losses() -> Iterator[None]:
    """Remove losses a test registers."""
    before = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(before)


def test_register_makes_a_part_available_by_name(clean_losses: None) -> None:
    @registered("loss")
    @dataclass(frozen=True)
    class DoubledCrossEntropy(Loss):
        name: ClassVar[str] = "doubled-ce"

        def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
            return 2 * CrossEntropy().per_sample(logits, targets)

    assert isinstance(build_policy({"loss": "doubled-ce"}).loss, DoubledCrossEntropy)
    with pytest.raises(ValueError, match="already registered"):
        register("loss", type("Other", (DoubledCrossEntropy,), {"name": "doubled-ce"}))
    with pytest.raises(TypeError, match="must subclass Loss"):
        register("loss", MyTransform)
    with pytest.raises(ValueError, match="unknown part kind"):
        register("metric", DoubledCrossEntropy)


BAD_SPECS: list[tuple[Any, str]] = [
    (["random"], "defence: expected a mapping"),
    ({"batch": "random"}, "defence.batch: unknown key; allowed: batching, loss, update"),
    ({"batching": "shuffled"}, "defence.batching: unknown batching 'shuffled'; known: distinct-labels, "),
    ({"batching": {"name": "label-count", "k": 0}}, "defence.batching.k: an integer >= 1, got 0"),
    ({"batching": {"label-count": {"k": 2.5}}}, "defence.batching.label-count.k: expected an integer, got 2.5"),
    ({"batching": {"random": 3}}, "defence.batching.random: random takes no inline value"),
    ({"batching": {"a": 1, "b": 2}}, "defence.batching: a batching mapping needs a 'name' key or exactly one key"),
    ({"loss": {"name": ""}}, "defence.loss.name: a part name must be a non-empty string"),
    ({"loss": {"label-smoothing": {"epsilon": 1.5}}}, "defence.loss.label-smoothing.epsilon: a number in [0, 1]"),
    ({"loss": {"mse": {"reduction": "sum"}}}, "defence.loss.mse.reduction: unknown parameter of mse; allowed: none"),
    ({"update": {"clip-l2": 1.0}}, "defence.update: expected a list of transforms"),
    ({"update": [{"clip-l2": 1.0}, {"clip-l2": {"norm": -1}}]}, "defence.update[1].clip-l2.norm: a positive finite"),
    (
        {"update": [{"clip-l2": {"bound": 1}}]},
        "defence.update[0].clip-l2.bound: unknown parameter of clip-l2; allowed: norm",
    ),
    ({"update": [{"clip-l2": None}]}, "defence.update[0].clip-l2.norm: required by clip-l2"),
    ({"update": ["prune"]}, "defence.update[0].prune.keep: required by prune"),
    (
        {"update": [{"prune": {"fraction": 0.9}}]},
        "defence.update[0].prune.fraction: unknown parameter of prune; allowed: keep",
    ),
    ({"update": [{"prune": 0}]}, "defence.update[0].prune.keep: a fraction in (0, 1]"),
    ({"update": [{"gaussian-noise": {}}]}, "defence.update[0].gaussian-noise.sigma: required unless noise_multiplier"),
    (
        {"update": [{"gaussian-noise": {"sigma": 0.1, "noise_multiplier": 1.0}}]},
        "defence.update[0].gaussian-noise.sigma: not allowed together with noise_multiplier",
    ),
    (
        {"update": [{"gaussian-noise": {"noise_multiplier": 1.0}}]},
        "defence.update[0].gaussian-noise.clip_norm: a positive",
    ),
    (
        {"update": [{"gaussian-noise": {"sigma": "lots"}}]},
        "defence.update[0].gaussian-noise.sigma: expected a number or null",
    ),
    ({"update": [{"quantize": {"bits": 0}}]}, "defence.update[0].quantize.bits: an integer from 1 to 16"),
    (
        {"update": [{"quantize": {"rounding": "up"}}]},
        "defence.update[0].quantize.rounding: expected one of 'stochastic'",
    ),
    ({"update": [{"clip-l2": True}]}, "defence.update[0].clip-l2.norm: expected a number, got True"),
    (
        {"loss": "no_such_pkg.mod:Thing"},
        "defence.loss: cannot import 'no_such_pkg.mod': no module 'no_such_pkg' in the working directory or PYTHONPATH",
    ),
    ({"loss": "no-such:Thing"}, "defence.loss: 'no-such:Thing' is not an import path of the form package.module"),
    ({"loss": "mse", "path": 3}, "defence.path: expected the folder of the import-path parts, got 3"),
    (
        {"loss": "tests.support.defence_plugins:Missing"},
        "defence.loss: 'tests.support.defence_plugins' has no attribute",
    ),
    (
        {"loss": "tests.support.defence_plugins:NotAPart"},
        "defence.loss: 'tests.support.defence_plugins:NotAPart' is not a Loss",
    ),
    ({"loss": "tests.support.defence_plugins:MyTransform"}, "is not a Loss subclass"),
    (
        {"update": ["defenses.transforms:UpdateTransform"]},
        "defence.update[0]: 'defenses.transforms:UpdateTransform' is abstract",
    ),
    (
        {"update": [{"tests.support.defence_plugins:MyTransform": {"factor": "x"}}]},
        "MyTransform.factor: expected a number",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_specs_name_the_field_path(spec: Any, message: str) -> None:
    with pytest.raises(DefenceConfigError) as caught:
        build_policy(spec)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(caught.value, ValueError)


def test_the_field_argument_prefixes_every_path() -> None:
    with pytest.raises(DefenceConfigError, match=r"^clients\[2\]\.defence\.update\[0\]\.prune\.keep: "):
        build_policy({"update": [{"prune": 2}]}, field="clients[2].defence")


def test_a_built_policy_plans_and_transforms() -> None:
    policy = build_policy({"batching": "identical-labels", "update": [{"clip-l2": 0.5}]})
    labels = np.repeat(np.arange(4), 8)
    plan = policy.batching.plan(labels, 4, 8, np.random.default_rng(0))
    assert all(len(set(labels[b].tolist())) == 1 for b in plan.batches)
    update = policy.transform({"w": torch.full((2, 4), 10.0)}, [torch.Generator(), torch.Generator()])
    torch.testing.assert_close(update["w"].norm(dim=1), torch.full((2,), 0.5))
