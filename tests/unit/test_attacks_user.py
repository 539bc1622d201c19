"""Your own attack: the example of docs/attacks.md, named by import path from the topology's folder, registered,
run by ``auto`` beside the built-in attacks, and one-line errors for classes that are no attack."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attacks import ATTACKS, Attack, AttackConfigError, AttackNotApplicable, auto_attacks, build_attack, register_attack
from testbed.config.schema import AttackConfig
from testbed.runtime.models import build_model
from tests.conftest import REPO
from tests.support.attacks import make_view, mnist_digits
from tests.support.user_code import write_module


def documented_attack() -> str:
    """The Python block of docs/attacks.md's "Write your own attack" section: the module a user saves."""
    text = (REPO / "docs" / "attacks.md").read_text(encoding="utf-8")
    section = text.split("\n## Write your own attack\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None
    return found.group(1)


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    """Every attack registered by a test is gone after it."""
    saved = dict(ATTACKS)
    yield
    ATTACKS.clear()
    ATTACKS.update(saved)


def test_the_documented_attack_loads_from_the_topology_folder_and_recovers_a_one_sample_image(
    tmp_path: Path,
) -> None:
    module = write_module(tmp_path, documented_attack(), stem="my_attacks")
    config = AttackConfig.model_validate(
        {"name": f"{module}:RowLeastSquares", "params": {"floor": 1e-9}}, context={"folder": str(tmp_path)}
    )
    assert config.path == str(tmp_path.resolve())
    assert config.names == ["row-least-squares"] and config.label == "row-least-squares"
    assert "row-least-squares" in auto_attacks()  # registered: auto now includes it (in_auto)
    attack = build_attack("row-least-squares", config.params_of("row-least-squares"))
    assert attack.params == {"floor": 1e-9} and attack.cost == "analytic"
    images, labels = mnist_digits([3])
    result = attack.reconstruct(make_view(build_model("softmax", (1, 28, 28), 10, seed=0), images, labels))
    assert torch.allclose(result.images, images, atol=1e-4)
    two_images, two_labels = mnist_digits([3, 4])
    view = make_view(build_model("softmax", (1, 28, 28), 10, seed=0), two_images, two_labels)
    with pytest.raises(AttackNotApplicable, match="row-least-squares: needs one sample and one step, got 2"):
        attack.check(view)


def test_auto_in_a_list_runs_every_image_attack_and_the_users_one(tmp_path: Path) -> None:
    module = write_module(tmp_path, documented_attack(), stem="my_attacks")
    written = f"{module}:RowLeastSquares"
    config = AttackConfig.model_validate(
        {"name": ["auto", written], "params": {written: {"floor": 1e-6}, "dlg": {"iterations": 3}}},
        context={"folder": str(tmp_path)},
    )
    assert config.names == [
        "dense-ratio",
        "ce-demix",
        "dlg",
        "inverting-gradients",
        "cocktail-party",
        "row-least-squares",
    ]
    assert config.params_of("row-least-squares") == {"floor": 1e-6} and config.params_of("dlg") == {"iterations": 3}
    assert config.optimisation_cap == 4 and config.label.startswith("auto: worst case of")
    with pytest.raises(ValueError, match=r"row-least-squares\.floor: must be a number >= 0, got -1"):
        AttackConfig.model_validate({"name": written, "params": {"floor": -1}}, context={"folder": str(tmp_path)})


USER_MISTAKES = """
from attacks import Attack, DenseRatio


class NotAnAttack:
    name = "not-an-attack"


class Clash(DenseRatio):
    name = "dlg"


class Abstract(Attack):
    name = "abstract-one"


class BadCost(DenseRatio):
    name = "bad-cost"
    cost = "cheap"
"""


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("NotAnAttack", "is not a subclass of attacks.Attack"),
        ("Clash", "attack name 'dlg' is already registered to DeepLeakage"),
        ("Abstract", "Abstract is abstract: implement _reconstruct, check"),
        ("BadCost", "BadCost.cost must be one of analytic, optimisation, got 'cheap'"),
        ("Missing", "has no attribute 'Missing'"),
    ],
)
def test_a_class_that_is_no_usable_attack_is_a_one_line_error_naming_the_field(
    tmp_path: Path, attribute: str, message: str
) -> None:
    module = write_module(tmp_path, USER_MISTAKES, stem="mistakes")
    with pytest.raises(AttackConfigError) as error:
        build_attack(f"{module}:{attribute}", folder=str(tmp_path))
    text = str(error.value)
    assert text.startswith("attack.name: ") and message in text and "\n" not in text


def test_a_missing_module_names_the_folders_searched(tmp_path: Path) -> None:
    with pytest.raises(AttackConfigError, match=r"attack.name: cannot import 'nowhere_attacks': no module"):
        build_attack("nowhere_attacks:Mine", folder=str(tmp_path))


def test_register_attack_serves_as_a_decorator_and_auto_follows_in_auto() -> None:
    @register_attack
    class Quiet(ATTACKS["dense-ratio"]):  # type: ignore[misc,valid-type]
        name = "quiet-ratio"
        in_auto = False

    assert ATTACKS["quiet-ratio"] is Quiet and isinstance(build_attack("quiet-ratio"), Attack)
    assert "quiet-ratio" not in auto_attacks()
    assert register_attack(Quiet) is Quiet  # twice: harmless


def test_a_relative_attack_path_is_read_from_the_topology_file_and_reaches_the_attack_actors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed.config.load import load_experiment
    from testbed.errors import UserError
    from testbed.runtime.user_models import code_folders, runtime_env

    topology, code, elsewhere = tmp_path / "topologies", tmp_path / "code", tmp_path / "elsewhere"
    for folder in (topology, code, elsewhere):
        folder.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    module = write_module(code, documented_attack(), stem="my_attacks")
    path = topology / "t.yaml"
    path.write_text(
        "name: t\nrounds: 1\nmodel: {name: softmax}\nclients: [{group: a, count: 2, batch_size: 1}]\n"
        f"attack: {{name: '{module}:RowLeastSquares', path: ../code}}\n",
        encoding="utf-8",
    )
    experiment = load_experiment(path)
    assert experiment.attack is not None and experiment.attack.path == str(code.resolve())
    assert code_folders(experiment) == [str(code.resolve())]
    assert runtime_env(experiment, joined=False) == {"env_vars": {"PYTHONPATH": str(code.resolve())}}
    assert runtime_env(experiment, joined=True) == {"py_modules": [str(code.resolve() / f"{module}.py")]}
    path.write_text(path.read_text(encoding="utf-8").replace(module, "absent_attacks"), encoding="utf-8")
    with pytest.raises(UserError, match=r"t.yaml:5: attack.name: cannot import 'absent_attacks': no module"):
        load_experiment(path)
