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
from defenses import LOSSES
from testbed.runtime.models import build_model
from tests.conftest import REPO
from tests.support.attacks import make_view, mnist_digits

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


def test_number_parameters_read_numeric_strings_as_defence_parameters_do() -> None:
    """One rule for numbers given as strings: YAML 1.1 keeps 1e-3 as text; attacks and defences both read it."""
    from defenses import build_policy

    assert build_attack("dlg", {"lr": "1e-3"}).params["lr"] == 0.001
    assert build_policy({"update": [{"clip-l2": "1e-3"}]}).transforms[0].describe()["norm"] == 0.001
    with pytest.raises(AttackConfigError, match=r"dlg\.lr: must be a number > 0, got 'fast'"):
        build_attack("dlg", {"lr": "fast"})
    with pytest.raises(AttackConfigError, match=r"dlg\.iterations: must be an integer >= 1, got '10'"):
        build_attack("dlg", {"iterations": "10"})


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


class _ZeroOneLoss:
    """The 0-1 loss: no gradient in the logits."""

    name = "zero-one"

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=-1) != targets).to(logits.dtype)


class _Focal:
    """The focal loss (Lin et al. 2017), a loss no attack was written for."""

    name = "focal"

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -((1 - log_p.exp()) ** 2) * log_p


def test_ce_demix_refuses_a_loss_it_cannot_differentiate_in_one_line() -> None:
    view = dataclasses.replace(_view("softmax"), loss=_ZeroOneLoss())
    with pytest.raises(AttackNotApplicable, match="ce-demix: cannot differentiate loss 'zero-one' twice"):
        build_attack("ce-demix").check(view)


@pytest.mark.parametrize("name", ["dlg", "inverting-gradients", "ce-demix"])
def test_every_attack_that_simulates_a_loss_accepts_one_it_was_not_written_for(name: str) -> None:
    view = dataclasses.replace(_view("softmax"), loss=_Focal())
    build_attack(name).check(view)


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


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_defence_loss_can_be_attacked(loss: str) -> None:
    """A loss a client can declare is a loss the attacks can simulate: the view carries the object itself."""
    view = dataclasses.replace(_view("softmax"), loss=LOSSES[loss]())
    for name in ("dlg", "inverting-gradients", "ce-demix"):
        build_attack(name).check(view)
