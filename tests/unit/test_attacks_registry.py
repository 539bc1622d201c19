"""Building attacks by name, parameter errors, views the attacks refuse, and the package's import rules."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from attacks import (
    ATTACKS,
    AttackConfigError,
    AttackerView,
    AttackNotApplicable,
    build_attack,
)
from testbed.runtime.models import build_model
from tests.conftest import REPO
from tests.unit.test_attacks_support import make_view, mnist_digits

SHAPE = (1, 28, 28)
NAMES = ["dense-ratio", "ce-demix", "label-inference", "dlg", "inverting-gradients", "cocktail-party"]


def test_registry_holds_the_six_attacks_under_their_names() -> None:
    assert sorted(ATTACKS) == sorted(NAMES)
    for name in NAMES:
        attack = build_attack(name)
        assert attack.name == name and attack.device == torch.device("cpu")


def test_unknown_attack_name_lists_the_allowed_ones() -> None:
    with pytest.raises(AttackConfigError, match="unknown attack 'dgl'; allowed: dense-ratio, ce-demix"):
        build_attack("dgl")


def test_unknown_parameter_lists_the_allowed_ones() -> None:
    with pytest.raises(AttackConfigError) as error:
        build_attack("inverting-gradients", {"iters": 10})
    assert str(error.value) == (
        "attack 'inverting-gradients': unknown parameter 'iters'; "
        "allowed: iterations, lr, tv_weight, restarts, seed, init, patience, min_delta, check_every"
    )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dlg", {"iterations": 0}, "dlg.iterations: must be an integer >= 1, got 0"),
        ("dlg", {"iterations": 2.5}, "dlg.iterations: must be an integer >= 1, got 2.5"),
        ("dlg", {"lr": 0}, "dlg.lr: must be a number > 0, got 0"),
        ("dlg", {"init": "zeros"}, "dlg.init: must be one of uniform, normal, constant, got 'zeros'"),
        ("dense-ratio", {"dedup_cosine": 2}, "dense-ratio.dedup_cosine: must be a number >= -1 and <= 1, got 2"),
        ("ce-demix", {"iterations": True}, "ce-demix.iterations: must be an integer >= 1, got True"),
    ],
)
def test_bad_parameter_values_raise_one_line_errors(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(AttackConfigError) as error:
        build_attack(name, params)
    assert str(error.value) == message


def test_parameters_override_defaults_and_keep_their_types() -> None:
    attack = build_attack("inverting-gradients", {"tv_weight": 0, "restarts": 3})
    assert attack.params["tv_weight"] == 0.0 and isinstance(attack.params["tv_weight"], float)
    assert attack.params["restarts"] == 3 and attack.params["iterations"] == 4800


def test_bad_device_is_a_config_error() -> None:
    with pytest.raises(AttackConfigError, match="device: not a torch device: 'gpu0'"):
        build_attack("dlg", device="gpu0")


def _view(model_name: str, **kwargs: object) -> AttackerView:
    images, labels = mnist_digits([1, 2])
    return make_view(build_model(model_name, SHAPE, 10, seed=0), images, labels, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "view_args", "reason"),
    [
        (
            "dense-ratio",
            ("lenet", {}),
            "dense-ratio: first dense layer follows convolutions; its input is not the image",
        ),
        ("dense-ratio", ("cnn", {}), "dense-ratio: first dense layer follows convolutions; its input is not the image"),
        ("cocktail-party", ("lenet", {}), "cocktail-party: first dense layer follows convolutions; its input is not"),
        (
            "ce-demix",
            ("softmax", {"kind": "delta", "local_steps": 2}),
            "ce-demix: needs one gradient step; the delta spans 2 local steps",
        ),
        ("ce-demix", ("lenet", {}), "ce-demix: needs a dense network (Flatten, Linear, elementwise activations); "),
    ],
)
def test_views_an_attack_cannot_handle_give_a_one_line_reason(
    name: str, view_args: tuple[str, dict[str, object]], reason: str
) -> None:
    view = _view(view_args[0], **view_args[1])
    attack = build_attack(name)
    for call in (attack.check, attack.reconstruct):
        with pytest.raises(AttackNotApplicable) as error:
            call(view)
        assert str(error.value).startswith(reason)
        assert "\n" not in str(error.value)


def test_ce_demix_names_the_losses_it_can_differentiate() -> None:
    view = dataclasses.replace(_view("softmax"), loss="hinge")  # a loss the clients cannot declare today
    with pytest.raises(AttackNotApplicable, match="ce-demix: cannot differentiate loss 'hinge'; known losses: "):
        build_attack("ce-demix").check(view)


@pytest.mark.parametrize("name", ["dlg", "inverting-gradients"])
def test_optimisation_attacks_refuse_a_loss_they_cannot_re_create(name: str) -> None:
    view = _view("softmax")
    odd = AttackerView(**{**view.__dict__, "loss": "focal"})
    with pytest.raises(AttackNotApplicable, match="cannot re-create loss 'focal'; known losses: cross-entropy"):
        build_attack(name).check(odd)


def test_a_view_rejects_inconsistent_fields_with_one_line_errors() -> None:
    view = _view("softmax")
    with pytest.raises(ValueError, match="kind: must be one of gradient, delta, got 'sum'"):
        AttackerView(**{**view.__dict__, "kind": "sum"})
    with pytest.raises(ValueError, match="labels: expected 2 labels"):
        AttackerView(**{**view.__dict__, "labels": torch.tensor([1])})


def test_the_package_imports_no_engine_defence_ray_or_mlflow() -> None:
    code = (
        "import sys, attacks; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'testbed', 'defenses', 'ray', 'mlflow'}); "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def _documented_defaults(attack: str) -> dict[str, str]:
    text = (REPO / "docs" / "attacks.md").read_text(encoding="utf-8")
    section = next(part for part in text.split("\n## ") if part.startswith(attack))
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    return {cells[1].strip().strip("`"): cells[2].strip().strip("`") for cells in rows}


@pytest.mark.parametrize("name", NAMES)
def test_docs_list_every_parameter_with_its_default(name: str) -> None:
    documented = _documented_defaults(name)
    declared = ATTACKS[name].parameters
    assert sorted(documented) == sorted(declared)
    for parameter, spec in declared.items():
        value = documented[parameter]
        assert (float(value) == pytest.approx(spec.default)) if spec.kind in (int, float) else value == spec.default
